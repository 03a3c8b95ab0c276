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
