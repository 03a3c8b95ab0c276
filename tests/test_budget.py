"""The performance budgets of benchmarks/bench_budget.py, without a GPU.

- The FLOP models (a launch's GEMM FLOPs from its grid and the kernel's tile loops; attention's
  is its launch plan's, with the plan's list of kernels) equal the FLOPs of the tl.dot calls the
  kernels execute under the interpreter, on problems that exercise
  every loop (masks, empty rows, shared queries, grouped keys, negatives, distillation, queries).
- Every paper workload stays within its budget (benchmarks/workloads.py): launches, executed
  FLOPs over useful, spill bytes, host synchronisations (host time is bench_host's check). Budgets
  are ceilings: a change that makes a workload worse fails here; one that improves it lowers the
  ceiling.
- The CUDA C++ kernels, as built for sm_90a, spill no more than CUDA_SPILL_BUDGETS allows.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, ON_GPU

import vlkernels
from benchmarks import bench_budget, static, workloads
from vlkernels import bias, masks
from vlkernels.attention import plan as P
from vlkernels.attention.args import AttentionArgs
from vlkernels.attention.plan import decode_splits
from vlkernels.contrastive import plan as CP

pytestmark = pytest.mark.skipif(ON_GPU, reason="counts the interpreter's tl.dot calls")


def _attention_cases():
    g = torch.Generator().manual_seed(0)
    t2m = torch.randint(0, 4, (3, 50), generator=g).sort(dim=1).values
    return [
        ("none, Lq 50 Lk 70", (2, 2, 2, 2, 50, 70, 40), None),
        (
            "causal & key_padding",
            (3, 3, 2, 1, 70, 70, 32),
            masks.causal() & masks.key_padding(torch.tensor([70, 33, 0])),
        ),
        (
            "qformer itg & pad, shared queries",
            (3, 1, 2, 2, 64, 64, 16),
            masks.qformer(32, "multimodal_causal") & masks.key_padding(torch.tensor([64, 40, 50])),
        ),
        ("qformer itc", (2, 2, 2, 2, 64, 64, 16), masks.qformer(24, "unimodal")),
        ("media immediate", (3, 3, 2, 2, 50, 48, 16), masks.media(t2m, 16, True)),
        (
            "prefix_lm & window",
            (2, 2, 4, 2, 80, 80, 16),
            masks.prefix_lm(torch.tensor([20, 70])) & masks.sliding_window(24),
        ),
        (  # every query in one tile: the backward is one kernel; keys no query attends
            "cross & pad, one query tile",
            (3, 3, 2, 2, 20, 77, 24),
            masks.key_padding(torch.tensor([77, 30, 0])),
        ),
        ("window, one query tile", (2, 2, 3, 3, 30, 80, 16), masks.causal() & masks.sliding_window(10)),
        (  # decoding: the keys split across programs (flash-decoding), then combined
            "decode: grouped heads packed, split keys",
            (3, 3, 4, 2, 2, 300, 16),
            masks.key_padding(torch.tensor([300, 77, 0])),
        ),
        (  # every key in one tile: the backward is one kernel
            "qformer & pad, grouped keys, one key tile",
            (3, 3, 4, 2, 30, 30, 16),
            masks.qformer(8, "bidirectional") & masks.key_padding(torch.tensor([30, 12, 0])),
        ),
    ]


@pytest.mark.parametrize("case", _attention_cases(), ids=lambda c: c[0])
def test_attention_flop_model_counts_the_executed_dots(case):
    _, (B, Bq, H, Hk, Lq, Lk, D), mask = case
    q = torch.randn(Bq, H, Lq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, Hk, Lk, D, device=DEVICE, requires_grad=True) for _ in range(2))
    lowered = masks.lower(mask, B, H, Lq, Lk, DEVICE)
    with static.counting_dots() as (launches, flops):
        out = vlkernels.attention(q, k, v, mask, backend="triton")
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    keys_fused = Bq == B and Lk <= 32  # the interpreter's tiles: 32 x 32
    queries_fused = Bq == B and not keys_fused and H == Hk and Lq <= 32
    backward = (
        {"_attn_bwd_dkdv"}
        if keys_fused
        else {"_attn_bwd_dq"}
        if queries_fused
        else {"_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq"}
        | ({"_attn_bwd_dq_sum"} if Bq < B else set())
    )
    split = decode_splits(B, H, Lq, Lk, torch.device(DEVICE))[0] > 1
    forward = {"_attn_fwd"} | ({"_attn_fwd_combine"} if split else set())
    assert split == (Lq <= 16 and Lk >= 256)
    assert {ln.name for ln in launches} == forward | backward
    plan = P.plan(AttentionArgs(q, k, v, lowered, 1.0))  # the call's plan: one per signature
    assert tuple(ln.name for ln in launches) == P.kernels(plan) + P.kernels(plan, backward=True)
    assert sum(bench_budget.launch_flops(ln, plan, lowered) for ln in launches) == flops[0]


@pytest.mark.parametrize("grad", ["t5 table", "alibi slopes", "float bias", "float bias, keys past 21 -inf"])
def test_attention_flop_model_counts_the_gradient_kernels(grad):
    """The kernels a learnable position table or float bias adds to the backward, and their
    FLOPs, as the plan's model says."""
    B, H, Lq, Lk, D = 2, 2, 70, 50, 16
    q = torch.randn(B, H, Lq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, device=DEVICE, requires_grad=True) for _ in range(2))
    mask, position = masks.key_padding(torch.tensor([50, 21], device=DEVICE)), None
    if grad == "t5 table":
        position = bias.t5(torch.randn(32, H, device=DEVICE, requires_grad=True), True)
    elif grad == "alibi slopes":
        position = bias.alibi(torch.rand(B, H, device=DEVICE, requires_grad=True))
    else:
        mask = torch.randn(B, 1, Lq, Lk, device=DEVICE)
        if grad.endswith("-inf"):  # the bias gradient's first pass skips the key tiles past 21
            mask[..., 21:] = float("-inf")
        mask.requires_grad_()
    table = [position.table] if position is not None else [mask]
    with static.counting_dots() as (launches, flops):
        out = vlkernels.attention(q, k, v, mask, position_bias=position, backend="triton")
        torch.autograd.grad(out, (q, k, v, *table), torch.randn_like(out))
    lowered = masks.lower(mask, B, H, Lq, Lk, DEVICE)
    if position is not None:
        lowered = lowered._replace(**bias.lower(position, B, H, Lq, Lk, DEVICE))
    plan = P.plan(AttentionArgs(q, k, v, lowered, 1.0))
    grads = dict(bias_grad=position is None, position_grad=position is not None)
    span = ("_attn_mask_span",) if position is None else ()
    assert tuple(ln.name for ln in launches) == span + P.kernels(plan) + P.kernels(plan, True, **grads)
    real = lowered if position is not None else lowered.with_span(B, Lq, Lk)
    assert sum(bench_budget.launch_flops(ln, plan, real) for ln in launches) == flops[0]


@pytest.mark.parametrize("kind", ["clip queues", "clip distill", "siglip", "max over queries"])
def test_contrastive_flop_model_counts_the_executed_dots(kind):
    g = torch.Generator().manual_seed(1)
    N, D = 45, 40
    x = torch.randn(N, 3, D, generator=g) if kind == "max over queries" else torch.randn(N, D, generator=g)
    y = torch.randn(N, D, generator=g)
    x, y = (torch.nn.functional.normalize(t, dim=-1).to(DEVICE).requires_grad_() for t in (x, y))
    s = torch.tensor(10.0, device=DEVICE)
    kw = {}
    if kind == "clip queues":
        kw = dict(
            image_negatives=torch.randn(20, D, device=DEVICE),
            text_negatives=torch.randn(37, D, device=DEVICE),
        )
    elif kind == "clip distill":
        kw = dict(
            text_negatives=torch.randn(37, D, device=DEVICE),
            distill=vlkernels.MomentumDistillation(x.detach() + 0.1, y.detach(), 0.4),
        )
    elif kind == "siglip":
        kw = dict(kind="siglip", logit_bias=torch.tensor(-5.0, device=DEVICE))
    with static.counting_dots() as (launches, flops):
        loss = vlkernels.contrastive_loss(x, y, s, backend="triton", **kw)
        torch.autograd.grad(loss, (x, y))
    fused = {"_loss_fwd_bands", "_loss_fwd_finish", "_ctr_bwd", "_loss_bwd_finish"}
    assert {ln.name for ln in launches} == ({"_ctr_fwd", "_ctr_bwd"} if kind == "clip distill" else fused)
    if kind != "clip distill":  # the fused loss: the plan's list of kernels
        assert tuple(ln.name for ln in launches) == CP.kernels() + CP.kernels(backward=True)
    assert sum(bench_budget.launch_flops(ln) for ln in launches) == flops[0]


def _budgets_in_subprocess():
    """Every workload's budget, computed in a process without the interpreter (compiled kernels)."""
    code = "import json, sys; from benchmarks import bench_budget as b; print(json.dumps(b.all_budgets()))"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLK_POISON")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=900
    )
    assert out.returncode == 0, out.stderr[-5000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_workload_within_its_budget():
    measured = _budgets_in_subprocess()
    over = bench_budget.over_budget(measured)
    assert not over, "over budget:\n" + "\n".join(over)
    # a patched model's dense mask executes the FLOPs of the analytic mask it spells out
    for dense, analytic in workloads.DENSE_OF.items():
        for metric in ("flops_ratio_fwd", "flops_ratio_bwd"):
            assert measured[dense][metric] == pytest.approx(measured[analytic][metric], rel=1e-12), dense


def test_cuda_kernels_within_their_spill_budget():
    # the GEMM kernels' SASS (bf16, head dim 64): the rest of the build's takes ~30 s to disassemble
    gemm = ("attn_fwd", "attn_dq", "attn_dkdv", "ctr_")
    kernels = bench_budget.cuda_budget(
        mix=lambda n: (
            n.startswith(gemm) and n.split("<")[1] in ("bf16>", "bf16, 64, false>", "bf16, 64, true>")
        )
    )
    if not kernels:
        pytest.skip("neither a vlkernels._C build with sm_90a nor nvcc")
    families = {name.split("<")[0] for name in kernels}
    assert families == {
        "attn_fwd_kernel",
        "attn_combine_kernel",
        "attn_delta_kernel",
        "attn_dq_kernel",
        "attn_dkdv_kernel",
        "attn_dpos_kernel",
        "ctr_fwd_kernel",
        "ctr_bwd_kernel",
        "gated_fwd_kernel",
        "gated_bwd_kernel",
        "mask_span_kernel",
    }
    gemms = [n for n in kernels if "mma" in kernels[n]]
    assert len(gemms) == 8 and all(kernels[n]["mma"] > 0 for n in gemms)  # on tensor cores (mma.sync)
    over = bench_budget.cuda_over_budget(kernels)
    assert not over, "over budget:\n" + "\n".join(over)
