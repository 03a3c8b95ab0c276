"""The same benchmarks as a pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``
(GPU; under the interpreter on CPU it runs, but the times mean nothing)."""

import pytest
import torch

from benchmarks import bench_attention, bench_contrastive

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu"


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", bench_attention.cases(QUICK, DEVICE), ids=lambda c: c.name)
@pytest.mark.parametrize(
    "provider", ["vlkernels-triton", "eager", "sdpa-bool-mask", "flex-attention", "xformers"]
)
def test_attention_fwd_bwd(benchmark, case, provider):
    fn = bench_attention.providers(DEVICE).get(provider)
    if isinstance(fn, str):
        pytest.skip(fn)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    q = torch.randn(case.Bq, case.H, case.Lq, case.D, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(case.B, case.H, case.Lk, case.D, device=DEVICE, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )
    mask = case.make_mask(DEVICE)
    dense = (
        mask.to_dense(case.B, case.Lq, case.Lk)
        if mask is not None
        else torch.ones(case.B, 1, case.Lq, case.Lk, dtype=torch.bool, device=DEVICE)
    )

    def step():
        out = fn(q, k, v, mask, dense)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        _sync()

    benchmark.pedantic(step, rounds=3 if QUICK else 20, warmup_rounds=1)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("N", [512] if QUICK else [8192, 32768])
def test_contrastive_fwd_bwd(benchmark, kind, N):
    provs = bench_contrastive.providers(kind, DEVICE)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    x = torch.randn(N, 768, device=DEVICE, dtype=dtype, requires_grad=True)
    y = torch.randn(N, 768, device=DEVICE, dtype=dtype, requires_grad=True)
    s, b = torch.tensor(10.0, device=DEVICE), torch.tensor(-5.0, device=DEVICE)
    fn = next(f for name, f in provs.items() if name.startswith("vlkernels"))

    def step():
        torch.autograd.grad(fn(x, y, s, b), (x, y))
        _sync()

    benchmark.pedantic(step, rounds=3 if QUICK else 20, warmup_rounds=1)
