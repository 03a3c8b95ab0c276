"""The benchmark suite runs (CPU: interpreter, tiny shapes, every provider that can run here)."""

from helpers import ON_GPU, assert_launched

from benchmarks import bench_attention
from benchmarks.common import PAIRED


def test_attention_benchmark_quick_runs_every_provider():
    with assert_launched("attention_fwd", "attention_bwd"):
        rows = bench_attention.run(quick=True, progress=lambda s: None)
    ran = {r["provider"] for r in rows}
    assert {"vlkernels-triton", "eager", "sdpa-bool-mask"} <= ran
    ops = {r["op"] for r in rows}
    assert len(ops) == len(
        bench_attention.cases(True, bench_attention.torch.device("cuda" if ON_GPU else "cpu"))
    )


def test_model_step_benchmark_and_plots_run(tmp_path):
    from benchmarks import bench_models, plot
    from benchmarks.common import append_rows

    with assert_launched("attention_fwd", "attention_bwd"):
        rows = bench_models.run(quick=True, progress=lambda s: None)
    assert {r["provider"] for r in rows} == {"eager", "vlkernels"}
    assert {r["op"] for r in rows} == {"train_step_blip2", "train_step_flamingo", "train_step_coca"}
    measured = [dict(r, p20=1.0, p50=2.0, p80=3.0) for r in rows]  # CPU times are NaN: plot stand-ins
    append_rows(measured, tmp_path / "r.csv")
    pngs = plot.plot(tmp_path / "r.csv", tmp_path / "plots")
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)


def test_cpu_attention_timing_alternates_providers_and_measures_memory():
    """The CPU path of the attention benchmark (what runs without a GPU or the interpreter): every
    provider timed in each mode, the peak memory from the CPU allocator's events, and vlkernels'
    time over each peer's in the same round (paired ratios)."""
    import torch

    from benchmarks import workloads

    case = workloads.WORKLOADS["qformer_self_itg"].at(B=2, H=3, Hk=3, D=16)
    q, k, v, mask, dense = bench_attention.inputs(case, 1, torch.device("cpu"), torch.float32)
    fns = {
        bench_attention.OURS_CPU: lambda q, k, v, m, d: bench_attention.vlkernels.attention(
            q, k, v, m, backend="torch"
        ),
        "sdpa": lambda q, k, v, m, d: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=d),
    }
    res = bench_attention.measure_cpu(fns, q, k, v, mask, dense, quick=True)
    modes = ("forward", "backward", "full")
    for name in fns:
        got = {(mode, metric): p50 for mode, metric, (_, p50, _) in res[name]}
        paired = {(mode, f"{PAIRED}sdpa") for mode in modes} if name == bench_attention.OURS_CPU else set()
        assert set(got) == {(m, "ms") for m in modes} | {("full", "peak_MiB")} | paired
        assert all(t > 0 for t in got.values())  # 2 x 3 x 64 x 16 fp32 gradients alone are 72 KiB


def test_transformers_benchmark_quick_runs_every_model_and_provider():
    import pytest

    pytest.importorskip("transformers")
    import vlkernels
    from benchmarks import bench_transformers

    with vlkernels.use_backend("torch"):
        rows = bench_transformers.run(quick=True, progress=lambda s: None, rounds=1)
    providers = {}
    for r in rows:
        providers.setdefault(r["op"], set()).add(r["provider"])
    assert set(providers) == set(bench_transformers.MODELS)
    # BLIP's and FLAVA's attention is written out in the model: transformers has no SDPA path there
    only = {"hf_blip": "transformers-eager", "hf_flava": "transformers-eager"}
    only |= {"open_clip_coca": "open_clip", "open_flamingo": "open_flamingo"}
    for op, got in providers.items():
        unpatched = {only[op]} if op in only else {"transformers-sdpa", "transformers-eager"}
        assert got == unpatched | {"vlkernels"}, op
    assert all(r["p50"] > 0 for r in rows)
