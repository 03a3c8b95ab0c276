"""The benchmark suite runs (CPU: interpreter, tiny shapes, every provider that can run here)."""

from helpers import ON_GPU, assert_launched

from benchmarks import bench_attention


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
