"""Performance budgets read without a GPU (``python -m benchmarks.run --op budget``).

For each paper workload — BLIP-2 Q-Former self-attention (ITM, ITG, ITC masks) and cross-attention,
Flamingo's media cross-attention, CoCa's pooler, PaLI's prefix-LM, decoding one token over a KV
cache of 256..8192 keys, the contrastive losses at N = 32k/64k, Flamingo's gated residual — in
bf16, forward and backward:

- launches: Triton kernels and PyTorch kernels of one call, and host synchronisations (recorded
  on fake CUDA tensors, benchmarks/static.py);
- GEMM FLOPs executed, from each launch's grid and the kernel's own tile loops (attention: the
  cost model of its launch plan, vlkernels/attention/plan.py; the contrastive kernels: the model
  below; tests/test_budget.py checks both against the tl.dot calls the interpreter runs), next to
  the useful FLOPs (no tile waste; attention's backward counts FlashAttention's 5 GEMMs per pair);
- the fewest HBM bytes (every input read once, every output written once; attention: the plan's);
- per kernel, compiled for sm_90a: registers, stack (spill) bytes, shared memory, warps per SM,
  wgmma / mma / cp.async / TMA and local-memory instruction counts;
- host microseconds of a call: the Python path and Triton's launch path up to the driver (CPU
  tensors, a driver that launches nothing: static.host_launch_path()), next to one bare Triton
  launch on the same path;
- an H100 time estimate, max(FLOPs / 790 TFLOP/s, bytes / 3.0 TB/s) (the bf16 GEMM and copy rates
  measured on the lent H100s), for vlkernels and for the dense peer (SDPA's
  flash kernel ignoring the mask; open_clip's N×N logits) — estimates, labelled so.

Rows go to benchmarks/results/budget.csv with device "static" (analysis) or "cpu" (host time).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable

import torch

from benchmarks import workloads as W

RESULTS = pathlib.Path(__file__).parent / "results" / "budget.csv"
PEAK_FLOPS = 790e12  # bf16 dense GEMM, measured on a lent H100
PEAK_BYTES = 3.0e12  # device-to-device copy, same source
CPU = torch.device("cpu")


@dataclasses.dataclass
class Workload:
    """One paper workload (``decl``: its declaration in benchmarks/workloads.py) with its cost
    models: ``make(device)`` gives the inputs of ``call(inputs)`` (the public op), which returns
    the output to differentiate and the tensors that need gradients."""

    decl: W.Attention | W.Contrastive | W.Gated
    make: Callable
    useful: Callable  # (inputs on CPU) -> (fwd FLOPs, bwd FLOPs)
    min_bytes: Callable | None  # (inputs) -> (fwd bytes, bwd bytes); None: the launch plan's
    peer_flops: Callable  # (inputs) -> (fwd FLOPs, bwd FLOPs)
    peer_bytes: Callable | None = None  # (inputs) -> (fwd bytes, bwd bytes); default: min_bytes

    name = property(lambda self: self.decl.name)
    op = property(lambda self: self.decl.op)
    peer = property(lambda self: self.decl.peer)
    head_dim = property(lambda self: getattr(self.decl, "D", 0))


# ----------------------------------------------------------------------------------------------
# Workloads: benchmarks/workloads.py's, with their inputs and cost models
# ----------------------------------------------------------------------------------------------


def _attention_inputs(w: W.Attention, device):
    q = torch.randn(w.Bq, w.H, w.Lq, w.D, device=device, dtype=w.dtype)
    k = torch.randn(w.B, w.Hk, w.Lk, w.D, device=device, dtype=w.dtype)
    v = torch.randn(w.B, w.Hk, w.Lk, w.D, device=device, dtype=w.dtype)
    inp = dict(q=q, k=k, v=v, mask=w.make_mask(device))
    if w.position == "t5":
        inp["position"] = W.t5_table(w, device)
    return inp


def _allowed_pairs(inp) -> int:
    """Allowed (query, key) pairs summed over batch and heads (the useful work)."""
    import vlkernels.masks as M

    q, k, mask = inp["q"], inp["k"], inp["mask"]
    B, H, Lq, Lk = k.shape[0], q.shape[1], q.shape[2], k.shape[2]
    allowed = M.lower(mask, B, H, Lq, Lk, CPU).allowed(Lq, Lk, CPU)
    return int(allowed.expand(B, 1, Lq, Lk).sum()) * H


def _attention_useful(inp):
    D = inp["q"].shape[-1]
    pairs = _allowed_pairs(inp)
    return 4 * D * pairs, 10 * D * pairs


def _attention_dense(inp):
    q, k = inp["q"], inp["k"]
    pairs = k.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    return 4 * q.shape[-1] * pairs, 10 * q.shape[-1] * pairs


def _dense_bias_bytes(inp):
    """(forward, backward) fewest HBM bytes of attention that takes a dense bias [B, H, Lq, Lk]
    (bf16) and returns its gradient: q, k, v, out, lse (and dout, dq, dk, dv) as
    ``plan.hbm_bytes``, the bias read forward and backward, its gradient written once."""
    q, k = inp["q"], inp["k"]
    e = q.element_size()
    B, H, Lq, Lk, D = k.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    qkv = (q.shape[0] * H * Lq + 2 * B * k.shape[1] * Lk) * D * e
    out, lse, dense = B * H * Lq * D * e, B * H * Lq * 4, B * H * Lq * Lk * e
    return qkv + out + lse + dense, 2 * qkv + 2 * out + lse + 2 * dense


# the bytes of a dense peer that is not the plan's minimum: SDPA's memory-efficient kernel reads
# a dense bias and writes its gradient
_PEER_BYTES = {"sdpa-mem-efficient, dense bias (est)": _dense_bias_bytes}


def _contrastive_inputs(w: W.Contrastive, device):
    x = torch.randn(w.N, *((w.Q,) if w.Q > 1 else ()), w.D, device=device, dtype=w.dtype)
    y = torch.randn(w.N, w.D, device=device, dtype=w.dtype)
    s = torch.tensor([10.0], device=device)
    b = torch.tensor([-10.0], device=device) if w.kind == "siglip" else None
    return dict(x=x, y=y, scale=s, bias=b, kind=w.kind)


def _contrastive_useful(inp):
    """The logits once (2·N²·D·Q) forward; their two gradient GEMMs backward (4·N²·D·Q)."""
    N, D = inp["y"].shape
    Q = inp["x"].shape[1] if inp["x"].dim() == 3 else 1
    return 2 * N * N * D * Q, 4 * N * N * D * Q


def _open_clip_flops(inp):
    """open_clip computes image·textᵀ and text·imageᵀ (SigLIP: one), each with two gradient GEMMs."""
    f, b = _contrastive_useful(inp)
    n = 1 if inp["kind"] == "siglip" else 2
    return n * f, n * b


def _contrastive_bytes(inp):
    e = inp["y"].element_size()
    feats = (inp["x"].numel() + inp["y"].numel()) * e
    return feats, 2 * feats


def _open_clip_bytes(inp):
    """N×N logits: ~16 bytes per logit and direction forward (bf16 GEMM output, scaled, fp32
    log-softmax read and written) and as many backward, on top of the features."""
    N = inp["y"].shape[0]
    n = 1 if inp["kind"] == "siglip" else 2
    f, b = _contrastive_bytes(inp)
    return f + 16 * n * N * N, b + 16 * n * N * N


def _gated_inputs(w: W.Gated, device):
    x = torch.randn(*w.shape, device=device, dtype=w.dtype)
    return dict(x=x, y=torch.randn_like(x), gate=torch.tensor([0.1], device=device))


def _gated_bytes(inp):
    from vlkernels.gated import plan as GP

    return GP.hbm_bytes(inp["x"].numel(), inp["x"].element_size())


def costed(decl) -> Workload:
    """The declared workload with its inputs and cost models."""
    if decl.op == "attention":
        peer_bytes = _PEER_BYTES.get(decl.peer)
        make = lambda d: _attention_inputs(decl, d)
        return Workload(decl, make, _attention_useful, None, _attention_dense, peer_bytes)
    if decl.op == "contrastive":
        make = lambda d: _contrastive_inputs(decl, d)
        return Workload(
            decl, make, _contrastive_useful, _contrastive_bytes, _open_clip_flops, _open_clip_bytes
        )
    zero = lambda inp: (0, 0)
    return Workload(decl, lambda d: _gated_inputs(decl, d), zero, _gated_bytes, zero)


def workloads() -> list[Workload]:
    return [costed(w) for w in W.WORKLOADS.values()]


def call(w: Workload, inp, backend="triton"):
    """The public op on ``inp``: (output, tensors that get gradients)."""
    import vlkernels

    if w.op == "attention":
        out = vlkernels.attention(
            inp["q"], inp["k"], inp["v"], inp["mask"], position_bias=inp.get("position"), backend=backend
        )
        return out, ("q", "k", "v")
    if w.op == "contrastive":
        kind = inp["kind"]
        loss = vlkernels.contrastive_loss(
            inp["x"], inp["y"], inp["scale"], inp["bias"], kind=kind, backend=backend
        )
        return loss, ("x", "y")
    return vlkernels.gated_residual(inp["x"], inp["y"], inp["gate"], backend=backend), ("x", "y")


# ----------------------------------------------------------------------------------------------
# Launches, recorded on fake CUDA tensors
# ----------------------------------------------------------------------------------------------


class _Ctx:
    """A stand-in autograd context: the backward is called by hand (the autograd engine needs a
    CUDA driver for fake CUDA tensors)."""

    def __init__(self, args):
        # q, k, v's gradients are computed regardless; a float bias's or a position table's only
        # when it requires one
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass


def _functions():
    from vlkernels.attention.autograd import AttentionFunction
    from vlkernels.contrastive.autograd import ContrastiveLoss
    from vlkernels.gated.autograd import GatedResidualFunction

    return (AttentionFunction, ContrastiveLoss, GatedResidualFunction)


def record(w: Workload):
    """(forward recording, backward recording, the launch plan: attention's, else None) of one
    call on fake CUDA tensors."""
    from benchmarks import static

    applied = []
    saved_apply = {f: f.apply for f in _functions()}

    def manual_apply(fn):
        def apply(*args):
            ctx = _Ctx(args)
            out = fn.forward(ctx, *args)
            applied.append((fn, ctx, out))
            return out

        return apply

    try:
        for f in _functions():
            f.apply = manual_apply(f)
        with static.fake_cuda():
            inp = w.make(torch.device("cuda"))
            with static.recording(loadable=True) as fwd_rec:
                call(w, inp)
            fn, ctx, out = applied[-1]
            plan = None
            if fn.__name__ == "AttentionFunction":  # the plan the call made (cached per signature)
                from vlkernels import _schema
                from vlkernels.attention import plan as P

                plan = P.plan(_schema.unstash(ctx).fwd)
            grads = [torch.empty_like(t) for t in (out if isinstance(out, tuple) else (out,))]
            if fn.__name__ == "AttentionFunction":
                grads[1] = None  # no gradient flows into lse
            with static.recording(loadable=True) as bwd_rec, torch.no_grad():  # as the engine runs it
                fn.backward(ctx, *grads)
    finally:
        for f, a in saved_apply.items():
            f.apply = a
    return fwd_rec, bwd_rec, plan


# ----------------------------------------------------------------------------------------------
# GEMM FLOPs of each launch, from its grid and the kernel's tile loops
# ----------------------------------------------------------------------------------------------


def attention_flops(launch, plan, mask) -> int:
    """Executed GEMM FLOPs of one recorded attention launch: the plan's cost model
    (vlkernels/attention/plan.py) at the launch's tiles, over ``mask``'s row intervals (CPU)."""
    from vlkernels.attention import plan as P

    lo, hi = P.row_intervals(*mask.intervals(plan.Lq, plan.Lk, CPU), plan.B, plan.Lk)
    a = launch.args
    return P.gemm_flops(plan, launch.name, a.get("BLOCK_M", 0), a.get("BLOCK_N", 0), lo, hi)


def launch_flops(launch, plan=None, mask=None) -> int:
    """Executed GEMM FLOPs of one recorded launch (tile waste included); attention's from its
    ``plan`` and ``mask``."""
    if launch.name.startswith("_attn"):
        return attention_flops(launch, plan, mask)
    if launch.name.startswith(("_ctr", "_loss")):
        from vlkernels.contrastive import plan as CP

        return CP.gemm_flops(launch.name, launch.args)
    return 0


# ----------------------------------------------------------------------------------------------
# Host time: the Python path on CPU tensors, Triton's launch path included up to the driver
# ----------------------------------------------------------------------------------------------


def _host_inputs(w: Workload):
    """The workload's structure at a size where the CPU work of the path's own PyTorch ops is
    small next to its Python cost."""
    inp = w.make(CPU)
    if w.op == "attention":
        from vlkernels import masks as M

        mask = inp["mask"]
        B = min(2, inp["k"].shape[0])  # and one head: the allocations stay small
        if isinstance(mask, M.Mask):
            cut = {
                f: getattr(mask, f)[:B]
                for f in ("key_lengths", "prefix_lengths")
                if getattr(mask, f) is not None
            }
            if mask.media is not None:
                cut["media"] = (mask.media[0][:B], *mask.media[1:])
            mask = dataclasses.replace(mask, **cut)
        elif isinstance(mask, torch.Tensor):  # a dense mask or bias [B, 1 or H, Lq, Lk]
            mask = mask.detach()[:B, :1].requires_grad_(mask.requires_grad)
        q, k, v = (inp[n][:B, :1] for n in ("q", "k", "v"))
        out = dict(q=q, k=k, v=v, mask=mask)
        position = inp.get("position")
        if position is not None:  # T5's table [H, buckets], ALiBi's slopes [B, H]: the first head
            table = position.table.detach()[:1] if position.kind == "t5" else position.table.detach()[:B, :1]
            out["position"] = dataclasses.replace(position, table=table.requires_grad_())
        return out
    if w.op == "contrastive":
        return dict(inp, x=inp["x"][:64], y=inp["y"][:64])
    return dict(inp, x=inp["x"][:1, :16], y=inp["y"][:1, :16])


def _median_us(times: list[float]) -> float:
    return sorted(times)[len(times) // 2] * 1e6


def host_us(w: Workload, repeats: int = 200) -> tuple[float, float]:
    """Median microseconds of the forward call and of the backward: the Python path and Triton's
    launch path (static.host_launch_path(): everything but the driver's launch itself)."""
    from benchmarks import static
    from vlkernels import _dispatch

    inp = _host_inputs(w)
    threads = torch.get_num_threads()
    # One thread for the path's own small CPU ops (allocations, fills): on a GPU they are launches,
    # and a thread pool waiting for a core that another process holds added milliseconds.
    torch.set_num_threads(1)
    try:
        with static.host_launch_path(), _dispatch.any_device():  # CPU tensors, as if they were CUDA ones
            names = call(w, inp)[1]
            for n in names:
                inp[n].requires_grad_(True)
            fwd, bwd = [], []
            for _ in range(repeats + 1):  # the first call compiles
                t0 = time.perf_counter()
                out, _ = call(w, inp)
                t1 = time.perf_counter()
                torch.autograd.grad(out, [inp[n] for n in names], torch.ones_like(out))
                t2 = time.perf_counter()
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
    finally:
        torch.set_num_threads(threads)
    return _median_us(fwd[1:]), _median_us(bwd[1:])


def bare_launch_us(repeats: int = 2000) -> float:
    """Median microseconds of one bare Triton launch on the same path as ``host_us`` (the gated
    residual's forward kernel, five arguments): the unit the host times compare with."""
    from benchmarks import static
    from vlkernels.gated.triton import _gated_fwd

    x = torch.zeros(1024)
    times = []
    with static.host_launch_path():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            _gated_fwd[(1,)](x, x, x, x, 1024, BLOCK=1024)
            times.append(time.perf_counter() - t0)
    return _median_us(times[1:])


# ----------------------------------------------------------------------------------------------
# The budget of one workload, and the benchmark's rows
# ----------------------------------------------------------------------------------------------


def _real_mask(w: Workload, inp):
    """The workload's mask as the kernels take it (a dense mask with its span: what the backend's
    prepare computes on the device), on CPU."""
    if w.op != "attention":
        return None
    from vlkernels import masks as M

    q, k = inp["q"], inp["k"]
    B, Lq, Lk = k.shape[0], q.shape[2], k.shape[2]
    return M.lower(inp["mask"], B, q.shape[1], Lq, Lk, CPU).with_span(B, Lq, Lk)


def budget(w: Workload, compile_kernels: bool = True, host: bool = True) -> dict:
    """Every measure of the module docstring for one workload (a flat dict)."""
    from benchmarks import static

    fwd_rec, bwd_rec, plan = record(w)
    inp = w.make(CPU)
    mask = _real_mask(w, inp)
    useful_f, useful_b = w.useful(inp)
    if plan is not None:
        from vlkernels.attention import plan as P

        bytes_f, bytes_b = P.hbm_bytes(plan, inp["q"].element_size())
        live = mask.dense_mask if mask.bias is None else mask.bias
        span = ()
        if live is not None:  # the span pass of the backend's prepare, once per forward
            bytes_f += P.span_bytes(live, plan.B, plan.Lq, plan.Lk)
            span = ("_attn_mask_span",)
        bias_grad = mask.bias is not None and mask.bias.requires_grad
        if mask.bias is not None:  # read by the forward and the backward; fp32 gradient [B, H, Lq, Lk]
            dense = mask.bias.expand(plan.B, plan.H, plan.Lq, plan.Lk)
            bytes_f += dense.numel() * dense.element_size()
            bytes_b += dense.numel() * dense.element_size() + bias_grad * dense.numel() * 4
        position = inp.get("position")
        position_grad = position is not None and position.table.requires_grad
        grads = dict(bias_grad=bias_grad, position_grad=position_grad)
        planned = (span + P.kernels(plan), P.kernels(plan, backward=True, **grads))
    else:
        bytes_f, bytes_b = w.min_bytes(inp)
        planned = None
    if w.op == "contrastive":
        from vlkernels.contrastive import plan as CP

        planned = (CP.kernels(), CP.kernels(backward=True))
    if w.op == "gated_residual":
        from vlkernels.gated import plan as GP

        planned = (GP.kernels(), GP.kernels(backward=True))
    for rec, kernels in zip((fwd_rec, bwd_rec), planned, strict=True) if planned else ():
        ran = tuple(ln.name for ln in rec.launches)
        if ran != kernels:  # the plan's launch model is what ran
            raise AssertionError(f"{w.name}: launched {ran}, the plan says {kernels}")
    peer_f, peer_b = w.peer_flops(inp)
    peer_bytes_f, peer_bytes_b = w.peer_bytes(inp) if w.peer_bytes else (bytes_f, bytes_b)
    exec_f = sum(launch_flops(ln, plan, mask) for ln in fwd_rec.launches)
    exec_b = sum(launch_flops(ln, plan, mask) for ln in bwd_rec.launches)
    out = dict(
        launches_fwd=fwd_rec.count,
        launches_bwd=bwd_rec.count,
        triton_launches_fwd=len(fwd_rec.launches),
        triton_launches_bwd=len(bwd_rec.launches),
        host_syncs=len(fwd_rec.host_syncs) + len(bwd_rec.host_syncs),
        gemm_flops_fwd=exec_f,
        gemm_flops_bwd=exec_b,
        useful_flops_fwd=useful_f,
        useful_flops_bwd=useful_b,
        hbm_bytes_fwd=bytes_f,
        hbm_bytes_bwd=bytes_b,
        est_h100_us=1e6
        * (max(exec_f / PEAK_FLOPS, bytes_f / PEAK_BYTES) + max(exec_b / PEAK_FLOPS, bytes_b / PEAK_BYTES)),
        peer_est_h100_us=1e6
        * (
            max(peer_f / PEAK_FLOPS, peer_bytes_f / PEAK_BYTES)
            + max(peer_b / PEAK_FLOPS, peer_bytes_b / PEAK_BYTES)
        ),
        torch_kernels=sorted(set(fwd_rec.torch_kernels + bwd_rec.torch_kernels)),
        kernels={},
    )
    if exec_f:
        out["flops_ratio_fwd"] = exec_f / useful_f
    if w.op == "attention":  # FlashAttention's backward: 5 GEMMs to the forward's 2
        out["bwd_over_fwd"] = exec_b / exec_f
    if exec_b:
        out["flops_ratio_bwd"] = exec_b / useful_b
    if w.op == "contrastive":  # executed FLOPs over N²·D (·Q for the queries' max): 6 is the minimum
        N, D = inp["y"].shape
        Q = inp["x"].shape[1] if inp["x"].dim() == 3 else 1
        out["flops_per_n2d"] = (exec_f + exec_b) / (N * N * D * Q)
    if compile_kernels:
        for ln in fwd_rec.launches + bwd_rec.launches:
            key = f"{ln.name}"
            while key in out["kernels"]:
                key += "'"
            out["kernels"][key] = static.resources(static.compile_launch(ln, 90))
    if host:
        out["host_us_fwd"], out["host_us_bwd"] = host_us(w)
    return out


# ----------------------------------------------------------------------------------------------
# Budgets: the ceilings of benchmarks/workloads.py, which tests/test_budget.py holds, and the targets
# ----------------------------------------------------------------------------------------------

CHECKED = (
    "launches_fwd",
    "launches_bwd",
    "host_syncs",
    "flops_ratio_fwd",
    "flops_ratio_bwd",
    "bwd_over_fwd",
    "flops_per_n2d",
    "spill_bytes",
)  # (host time: bench_host's paired ratios to SDPA are its CI check; here it is a row, not a budget)


def summarise(b: dict) -> dict:
    """The checked measures of one workload's budget (spill_bytes: the most of any kernel)."""
    out = {k: b[k] for k in CHECKED if k in b}
    out["spill_bytes"] = max((r["stack_bytes"] for r in b["kernels"].values()), default=0)
    return out


def all_budgets() -> dict:
    """The checked measures of every workload (host time is not one of them: not timed here)."""
    return {w.name: summarise(budget(w, host=False)) for w in workloads()}


# Where the kernels should get to (host time: bench_host.TARGETS): the backward at most 2.5x the
# forward's FLOPs, no spills, one forward launch; the contrastive loss within 10 FLOPs per N²·D.
TARGETS = dict(
    attention=dict(bwd_over_fwd=2.5, spill_bytes=0, launches_fwd=1),
    contrastive=dict(flops_per_n2d=10, spill_bytes=0, launches_fwd=3, launches_bwd=3, host_syncs=0),
    gated_residual=dict(launches_fwd=1, launches_bwd=2),
)


def over_budget(measured: dict) -> list[str]:
    """'workload metric: value > ceiling' for every measure over its budget."""
    out = []
    for name, values in measured.items():
        for metric, ceiling in W.WORKLOADS[name].budget.ceilings().items():
            if values.get(metric, 0) > ceiling + 1e-9:
                out.append(f"{name} {metric}: {values[metric]:.4g} > {ceiling:.4g}")
    return out


def missed_targets(w: Workload, values: dict) -> list[str]:
    targets = dict(TARGETS.get(w.op, {}))
    if w.head_dim > 128:  # no spills is the target at head dims up to 128
        targets.pop("spill_bytes")
    return [f"{m} {values[m]:.3g} > {t}" for m, t in targets.items() if values.get(m, 0) > t]


# ----------------------------------------------------------------------------------------------
# The CUDA C++ backend: its kernels as built for sm_90a
# ----------------------------------------------------------------------------------------------

# Spill (stack) bytes of the CUDA kernels that spill; every other kernel: 0. Head dim 256 keeps
# two 64x256 fp32 accumulators per block in dk/dv; the contrastive backward keeps 32 B of indices.
CUDA_SPILL_BUDGETS = {  # attention kernels, last argument: soft-capping, dropout, position bias compiled in
    "attn_dkdv_kernel<float, 256, false>": 816,
    "attn_dkdv_kernel<float, 256, true>": 904,
    "attn_dkdv_kernel<bf16, 128, true>": 8,
    "attn_dkdv_kernel<fp16, 128, true>": 8,
    "attn_dkdv_kernel<bf16, 256, false>": 440,
    "attn_dkdv_kernel<fp16, 256, false>": 440,
    # (+64 B since the dropout seed is read from a device tensor and held across the loops; read
    # at each use instead, 72 B; +32 B (fp32: +8 B) since dropout's 1 / (1 - p) scales dV once
    # summed instead of P before its rounding to 16 bits)
    "attn_dkdv_kernel<bf16, 256, true>": 496,
    "attn_dkdv_kernel<fp16, 256, true>": 496,
    # fp32 at head dim 32: the position gradient's two passes keep P, dP and each element's bucket
    # or distance in registers (bf16 / fp16 and larger head dims: none)
    "attn_dpos_kernel<float, 32>": 56,
    "ctr_bwd_kernel<float>": 32,
    "ctr_bwd_kernel<bf16>": 32,
    "ctr_bwd_kernel<fp16>": 32,
    "ctr_fwd_kernel<float>": 8,
}


def cuda_binaries() -> list[str]:
    """The built ``vlkernels._C`` when it holds sm_90a code (``pip install -e .`` builds it), else
    csrc/*.cu compiled here to sm_90a cubins (nvcc, ~1.5 min), else nothing."""
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    from benchmarks import static

    spec = importlib.util.find_spec("vlkernels._C")
    if spec is not None and spec.origin:
        listing = subprocess.run([static._cuobjdump(), "-lelf", spec.origin], capture_output=True, text=True)
        if "sm_90a" in listing.stdout:
            return [spec.origin]
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not pathlib.Path(nvcc).exists():
        return []
    tmp = pathlib.Path(tempfile.mkdtemp())
    out = []
    for source in sorted((pathlib.Path(__file__).parent.parent / "csrc").glob("*.cu")):
        out.append(str(tmp / f"{source.stem}.cubin"))
        subprocess.run(
            [nvcc, "-O3", "-std=c++17", "-arch=sm_90a", "-cubin", "-o", out[-1], str(source)], check=True
        )
    return out


def cuda_budget(mix=None) -> dict[str, dict]:
    """Per CUDA C++ kernel, its sm_90a resources (static.cuda_resources, with the instruction mix
    of the kernels ``mix`` accepts); {} without a build."""
    from benchmarks import static

    return {k: r for b in cuda_binaries() for k, r in static.cuda_resources(b, "sm_90a", mix).items()}


def cuda_over_budget(kernels: dict[str, dict]) -> list[str]:
    return [
        f"{name} spill_bytes: {r['stack_bytes']} > {CUDA_SPILL_BUDGETS.get(name, 0)}"
        for name, r in kernels.items()
        if r["stack_bytes"] > CUDA_SPILL_BUDGETS.get(name, 0)
    ]


def run(quick: bool, progress=print, rows=None) -> list[dict]:
    from benchmarks.common import environment

    env = environment()
    bare = bare_launch_us()
    progress(f"one bare Triton launch (5 arguments), host path: {bare:.1f} us")
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    rows.append(
        dict(
            env,
            op="budget_bare_triton_launch",
            provider="triton",
            mode="fwd",
            dtype="float32",
            shape="",
            metric="host_us",
            p20=bare,
            p50=bare,
            p80=bare,
            device="cpu",
        )
    )
    for w in workloads():
        progress(f"{w.name}: launches, FLOPs, bytes, compiled kernels, host time")
        b = budget(w, host=True)
        base = dict(op=f"budget_{w.name}", dtype="bfloat16", **env)

        def row(provider, mode, metric, value, device="static", base=base):
            rows.append(
                dict(
                    base,
                    provider=provider,
                    mode=mode,
                    shape="",
                    metric=metric,
                    p20=value,
                    p50=value,
                    p80=value,
                    device=device,
                )
            )

        for metric in (
            "launches",
            "triton_launches",
            "gemm_flops",
            "useful_flops",
            "hbm_bytes",
            "flops_ratio",
            "host_us",
        ):
            for mode in ("fwd", "bwd"):
                if f"{metric}_{mode}" in b:
                    row(
                        "vlkernels-triton",
                        mode,
                        metric,
                        b[f"{metric}_{mode}"],
                        "cpu" if metric == "host_us" else "static",
                    )
        for metric in ("host_syncs", "bwd_over_fwd", "flops_per_n2d"):
            if metric in b:
                row("vlkernels-triton", "full", metric, b[metric])
        row("vlkernels-triton", "full", "est_h100_us", b["est_h100_us"])
        row(w.peer, "full", "est_h100_us", b["peer_est_h100_us"])
        for kernel, res in b["kernels"].items():
            for metric, value in res.items():
                row(f"vlkernels-triton:{kernel}", "sm_90a", metric, value)
        missed = missed_targets(w, summarise(b))
        progress(
            f"    launches {b['launches_fwd']}+{b['launches_bwd']}, "
            + (
                f"FLOPs x{b['flops_ratio_fwd']:.2f}/x{b['flops_ratio_bwd']:.2f} of useful, "
                if "flops_ratio_fwd" in b
                else ""
            )
            + f"est {b['est_h100_us']:.0f} us vs {w.peer} {b['peer_est_h100_us']:.0f} us, "
            + f"host {b['host_us_fwd']:.0f}+{b['host_us_bwd']:.0f} us; "
            + (f"targets missed: {', '.join(missed)}" if missed else "targets met")
        )
    progress("CUDA C++ kernels, sm_90a")
    for kernel, res in cuda_budget().items():
        for metric, value in res.items():
            rows.append(
                dict(
                    env,
                    op="budget_cuda_kernels",
                    provider=f"vlkernels-cuda:{kernel}",
                    mode="sm_90a",
                    dtype="",
                    shape="",
                    metric=metric,
                    p20=value,
                    p50=value,
                    p80=value,
                    device="static",
                )
            )
    return rows


def summary(rows: list[dict]) -> None:
    """One line per workload: launches, FLOPs over useful, spills, host time, the two estimates."""
    by = {}
    for r in rows:
        by.setdefault(r["op"], {})[(r["provider"], r["mode"], r["metric"])] = r["p50"]
    bare = by.pop("budget_bare_triton_launch")["triton", "fwd", "host_us"]
    cuda = by.pop("budget_cuda_kernels", {})
    print(f"host times in us; one bare Triton launch takes {bare:.1f} us on the same path")
    cols = ("workload", "launches", "FLOPs/useful", "spill B", "host us", "est us", "peer est us")
    print("{:<28} {:>9} {:>13} {:>8} {:>9} {:>9} {:>12}".format(*cols))
    for op, m in by.items():
        ours = {(mode, metric): v for (p, mode, metric), v in m.items() if p == "vlkernels-triton"}
        ratio = "-"
        if ("fwd", "flops_ratio") in ours:
            ratio = f"{ours['fwd', 'flops_ratio']:.2f}/{ours['bwd', 'flops_ratio']:.2f}"
        spills = sum(v for (_, _, metric), v in m.items() if metric == "stack_bytes")
        peer = next(
            v for (p, _, metric), v in m.items() if metric == "est_h100_us" and p != "vlkernels-triton"
        )
        launches = f"{ours['fwd', 'launches']:.0f}+{ours['bwd', 'launches']:.0f}"
        host = f"{ours['fwd', 'host_us']:.0f}+{ours['bwd', 'host_us']:.0f}"
        est = ours["full", "est_h100_us"]
        name = op.removeprefix("budget_")
        print(f"{name:<28} {launches:>9} {ratio:>13} {spills:>8.0f} {host:>9} {est:>9.0f} {peer:>12.0f}")
    if cuda:
        spilling = {
            p.split(":", 1)[1]: v for (p, _, metric), v in cuda.items() if metric == "stack_bytes" and v
        }
        kernels = len({p for p, _, _ in cuda})
        print(f"CUDA C++ kernels (sm_90a): {kernels}, spilling: {spilling or 'none'}")
