"""Launch plans: one per call signature, every launch decision made once; the compiled kernels of
a plan launched directly, with exactly the arguments Triton's own launch passes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DEVICE

import vlkernels
from vlkernels import _dispatch, masks
from vlkernels.attention import args as A
from vlkernels.attention import plan as P


def _args(q, k, v, mask=None, **kw):
    B, H, Lq, Lk = k.shape[0], q.shape[1], q.shape[2], k.shape[2]
    return A.AttentionArgs(q, k, v, masks.lower(mask, B, H, Lq, Lk, q.device), 0.25, **kw)


def test_one_plan_per_signature():
    """The same plan object for every call of a signature (other tensors, other lengths); another
    plan when something Triton compiles for changes: strides, dtype, the mask's parts, a flag."""
    q, k, v = (torch.randn(2, 2, 40, 16, device=DEVICE) for _ in range(3))
    lengths = torch.tensor([40, 9], device=DEVICE)
    first = P.plan(_args(q, k, v, masks.key_padding(lengths)))
    again = P.plan(
        _args(q.clone(), k.clone(), v.clone(), masks.key_padding(torch.tensor([3, 4], device=DEVICE)))
    )
    assert again is first
    others = [
        _args(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, masks.key_padding(lengths)),  # strides
        _args(q.half(), k.half(), v.half(), masks.key_padding(lengths)),  # dtype
        _args(q, k, v, masks.key_padding(lengths) & masks.causal()),  # the mask's parts
        _args(q, k, v, masks.key_padding(lengths), softcap=3.0),  # a compile-time flag
    ]
    plans = [P.plan(a) for a in others]
    assert all(p is not first for p in plans) and len({id(p) for p in plans}) == len(plans)


def test_backward_uses_the_forward_plan(monkeypatch):
    made = []
    make = P._make
    monkeypatch.setattr(P, "_make", lambda a: made.append(1) or make(a))
    P._PLANS.clear()
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = vlkernels.attention(q, k, v, masks.causal(), backend="triton")
    torch.autograd.grad(out.sum(), (q, k, v))
    assert len(made) == 1


DIRECT = textwrap.dedent(
    """
    import torch, triton, vlkernels
    from benchmarks import static
    from vlkernels import _dispatch, masks
    from vlkernels.attention import plan as P

    runs, launched = [], []
    run = triton.runtime.JITFunction.run
    triton.runtime.JITFunction.run = lambda self, *a, **k: runs.append(1) or run(self, *a, **k)

    def inputs(offset=0, seed=0):
        g = torch.Generator().manual_seed(seed)
        n = 2 * 2 * 40 * 16
        store = torch.randn(3 * n + offset, generator=g).half()[offset:]  # offset 1: not 16-byte aligned
        q, k, v = (store[i * n : (i + 1) * n].view(2, 2, 40, 16).requires_grad_() for i in range(3))
        return q, k, v, masks.key_padding(torch.tensor([40, 17 + seed])), torch.ones(2, 2, 40, 16).half()

    given = []  # the tensors a call passes in: the same objects in the same places

    def call(q, k, v, m, gout):
        given[:] = [q, k, v, m.key_lengths, gout]
        out = vlkernels.attention(q, k, v, m, backend="triton")
        torch.autograd.grad(out, (q, k, v), gout)

    def same(a, b):
        if isinstance(a, torch.Tensor):  # outputs are new each call: the same layout
            if any(a is t for t in given) or any(b is t for t in given):
                return a is b
            return (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
        if isinstance(a, tuple):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return getattr(a, "value", a) == getattr(b, "value", b)

    def compare(direct, triton_path):
        assert len(direct) == len(triton_path), (len(direct), len(triton_path))
        for d, t in zip(direct, triton_path):
            assert d[:6] == t[:6], "grid, stream, function, metadata differ"  # [6]: launch metadata
            assert same(d[9:], t[9:]), "arguments differ"

    with static.host_launch_path(launched), _dispatch.any_device():  # CPU tensors on the host launch path
        call(*inputs())  # Triton's launch path: compiles
        n_runs, n_launches = len(runs), len(launched)
        second = inputs(seed=1)
        call(*second)  # the plan's kernels, launched directly
        assert len(runs) == n_runs, "the second call went through Triton"
        direct = launched[n_launches:]
        P._PLANS.clear()  # the same call through Triton's launch path
        call(*second)
        assert len(runs) > n_runs
        compare(direct, launched[n_launches + len(direct):])
        runs.clear()
        call(*inputs(offset=1, seed=1))  # pointers Triton specialises otherwise: through Triton again
        assert runs, "a misaligned tensor took a kernel compiled for aligned ones"
    print("direct", len(direct))
    """
)


def test_direct_launches_pass_what_tritons_launch_passes():
    """On the host launch path (Triton compiles for sm_90, a driver that launches nothing and
    records the launcher's arguments): a plan's second call launches its kernels directly, with
    the grid, kernel and arguments Triton's own launch passes for the same call; a tensor whose
    alignment Triton specialises differently goes through Triton's path again."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLK_POISON")}
    run = subprocess.run([sys.executable, "-c", DIRECT], capture_output=True, text=True, env=env, cwd=".")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "direct 2" in run.stdout  # the forward, and the backward in one kernel (one tile holds 40 keys)


def test_triton_span_kernel_is_the_spans_definition():
    """The Triton backend computes a dense or float mask's per-row span of allowed keys in one
    kernel: equal to MaskArgs.with_span (torch operations, the definition) for masks of every
    broadcastable rank, over heads, with rows of no key."""
    from vlkernels.attention import triton as T

    g = torch.Generator().manual_seed(0)
    B, H, Lq, Lk = 2, 3, 37, 70
    for shape in [(B, H, Lq, Lk), (1, 1, Lq, Lk), (B, 1, 1, Lk), (Lq, Lk), (Lk,), (B, H, Lq, 1), (H, Lq, Lk)]:
        allowed = torch.rand(shape, generator=g) > 0.8
        for mask in (allowed, torch.where(allowed, torch.randn(shape, generator=g), float("-inf"))):
            mask = mask.to(DEVICE)
            q, k = torch.randn(1, H, Lq, 8, device=DEVICE), torch.randn(B, H, Lk, 8, device=DEVICE)
            a = A.AttentionArgs(q, k, k, masks.lower(mask, B, H, Lq, Lk, q.device), 0.3)
            want = a.mask.with_span(B, Lq, Lk)
            got = T._with_span(a).mask
            assert torch.equal(got.row_lo, want.row_lo) and torch.equal(got.row_hi, want.row_hi), shape
            if mask.dtype != torch.bool:
                assert got.row_run is None  # a float bias is added everywhere: no row skips its loads
                continue
            full = mask.reshape((1,) * (4 - mask.dim()) + mask.shape).expand(B, -1, Lq, Lk)
            span = (want.row_hi - want.row_lo).clamp(min=0)
            run = (full.sum((1, 3)) == full.shape[1] * span) | (span == 0)
            assert torch.equal(got.row_run, run.to(torch.uint8)), shape


def _run_rows_mask(B, H, Lq, Lk, g):
    """A bool [B, H, Lq, Lk] mask whose rows are random runs of keys (some empty, some whole),
    with a hole punched into every third row (on one head only in some), and which rows are runs."""
    lo = torch.randint(0, Lk, (B, 1, Lq, 1), generator=g)
    hi = torch.minimum(lo + torch.randint(0, Lk, (B, 1, Lq, 1), generator=g), torch.tensor(Lk))
    hi[:, :, ::7] = lo[:, :, ::7]  # empty rows
    n = torch.arange(Lk)
    mask = ((n >= lo) & (n < hi)).expand(B, H, Lq, Lk).clone()
    holes = (torch.arange(Lq) % 3 == 0) & (hi - lo >= 3).view(B, Lq)  # [B, Lq]
    mid = ((lo + hi) // 2).view(B, Lq)
    for b, i in holes.nonzero().tolist():
        mask[b, (b + i) % H if i % 2 else slice(None), i, mid[b, i]] = False
    return mask, ~holes


def test_triton_dense_mask_rows_that_are_runs_load_no_mask_element():
    """A dense bool mask's rows whose allowed keys are one run on every head are bounded by their
    span alone: the kernels (forward, dq, dk/dv) load none of their mask elements. Shown by giving
    the kernels, with the span computed from the true mask, a dense mask that is False on every run
    row: the results still equal the float64 reference under the true mask."""
    from vlkernels.attention import triton as T
    from vlkernels.reference import attention_ref

    g = torch.Generator().manual_seed(3)
    for B, H, Hk, Lq, Lk in ((2, 2, 2, 45, 70), (3, 4, 2, 20, 33), (2, 2, 1, 70, 30)):
        mask, runs = _run_rows_mask(B, H, Lq, Lk, g)
        q, k, v, do = (
            torch.randn(s, generator=g, dtype=torch.float64)
            for s in [(B, H, Lq, 16), (B, Hk, Lk, 16), (B, Hk, Lk, 16), (B, H, Lq, 16)]
        )
        q, k, v, do = (t.float().to(DEVICE) for t in (q, k, v, do))
        mask = mask.to(DEVICE)
        a = T._with_span(A.AttentionArgs(q, k, v, masks.lower(mask, B, H, Lq, Lk, q.device), 0.25))
        assert torch.equal(a.mask.row_run.bool().cpu(), runs)
        garbage = mask & ~a.mask.row_run.bool()[:, None, :, None]  # run rows: nothing allowed
        a = a._replace(mask=a.mask._replace(dense_mask=garbage))
        out, lse = T._forward(a)
        dq, dk, dv = T._backward(A.AttentionGradArgs(do, out, lse, a))
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        want = attention_ref(*leaves, mask, scale=0.25, upcast=True)
        grads = torch.autograd.grad(want, leaves, do.double())
        for got, ref in zip((out, dq, dk, dv), (want, *grads), strict=True):
            torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


GRIDS = textwrap.dedent(
    """
    import torch
    from benchmarks import static
    from vlkernels import masks
    from vlkernels.attention import args as A
    from vlkernels.attention import triton as T

    cases = [  # (B, H, Hk, Lq, Lk, D, mask)
        (2048, 32, 8, 1, 4096, 128, None),  # decoding a batch of 2048: 65,536 (batch, head) pairs
        (2048, 40, 40, 1, 1024, 64, "bias"),  # a float bias and its gradient
        (8192, 12, 12, 64, 64, 64, "dense"),  # a Q-Former batch of 8192 under a dense mask
        (3000, 32, 32, 200, 200, 64, "shared"),  # shared queries: dq in chunks
        (4, 8, 8, 1, 8192, 64, None),  # few rows over many keys: split keys, then the combine
    ]
    with static.fake_cuda(), static.recording() as rec:
        for B, H, Hk, Lq, Lk, D, kind in cases:
            q = torch.empty(1 if kind == "shared" else B, H, Lq, D, dtype=torch.bfloat16, device="cuda")
            k = torch.empty(B, Hk, Lk, D, dtype=torch.bfloat16, device="cuda")
            mask = {
                "bias": torch.empty(B, H, Lq, Lk, dtype=torch.float32, device="cuda"),
                "dense": torch.empty(B, 1, Lq, Lk, dtype=torch.bool, device="cuda"),
            }.get(kind)
            a = T._with_span(A.AttentionArgs(q, k, k, masks.lower(mask, B, H, Lq, Lk, q.device), 0.1))
            out, lse = T._forward(a)
            g = A.AttentionGradArgs(out, out, lse, a)
            T._backward(g)
            if kind == "bias":
                T._bias_grad(g)
    limits = (2**31 - 1, 65535, 65535)
    names = set()
    for ln in rec.launches:
        grid = (*ln.grid, 1, 1)[:3]
        assert all(0 < n <= m for n, m in zip(grid, limits)), (ln.name, grid)
        names.add(ln.name)
    print("grids", len(rec.launches), sorted(names))
    """
)


def test_grids_stay_within_cudas_limits_at_large_batches():
    """Every attention kernel's grid, recorded on fake CUDA tensors (no interpreter), stays within
    CUDA's limits (axis 0 below 2**31, axes 1 and 2 at most 65,535) for batches whose (batch,
    head) pairs pass 65,535: heads and batch entries get axes of their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLK_POISON")}
    run = subprocess.run([sys.executable, "-c", GRIDS], capture_output=True, text=True, env=env, cwd=".")
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = (
        "fwd",
        "fwd_combine",
        "mask_span",
        "bwd_delta",
        "bwd_dkdv",
        "bwd_dq",
        "bwd_dq_sum",
        "bwd_dbias",
    )
    assert all(f"_attn_{k}'" in run.stdout for k in kernels), run.stdout


def test_batches_and_heads_past_a_grid_axis_go_to_the_torch_backend():
    """Past 65,535 batch entries or heads (a CUDA grid axis each) both kernel backends say why they
    cannot serve, and automatic dispatch on the CPU runs the torch backend, which has no such
    limit (meta tensors: nothing is allocated)."""
    from vlkernels.attention import cuda as C
    from vlkernels.attention import triton as T

    past = P.GRID_AXIS_MAX + 1
    for B, H, Hk in ((past, 1, 1), (1, past, 1), (1, 2 * past, 2)):
        q = torch.empty(B, H, 1, 16, device="meta")
        k = torch.empty(B, Hk, 3, 16, device="meta")
        a = _args(q, k, k)
        for backend in (T.BACKEND, C.BACKEND):
            (why,) = [r for r in _dispatch.not_supported_reasons("attention", backend, a) if "grid axis" in r]
            assert str(past) in why or str(2 * past) in why, why
    at_limit = torch.empty(P.GRID_AXIS_MAX, P.GRID_AXIS_MAX, 1, 16, device="meta")
    for backend in (T.BACKEND, C.BACKEND):
        reasons = _dispatch.not_supported_reasons("attention", backend, _args(at_limit, at_limit, at_limit))
        assert not [r for r in reasons if "grid axis" in r]
    q, k, v = (torch.randn(P.GRID_AXIS_MAX + 1, 1, n, 8) for n in (1, 3, 3))
    with pytest.warns(UserWarning, match="torch backend.*65535 batch entries and heads"):
        out = vlkernels.attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_configs_past_a_blocks_shared_memory_are_pruned(monkeypatch):
    """On a GPU the kernels' prunes keep only configs whose shared-memory bound fits a block: the
    ones Triton 3.6 built above 227 KB for sm_90a (decoding bf16 head dim 256: 274,432 B, fp32 head
    dim 128: 278,528 B; fused dk/dv fp32 head dim 256: 245,888 B) are gone, and every kernel keeps a
    config at every head dim, dtype and mask (tests/test_kernels_compile.py holds the bound above
    what Triton allocates)."""
    monkeypatch.setattr(P, "interpreter_on", lambda: False)
    decode = next(c for c in P.FWD_CONFIGS if c.kwargs == {"BLOCK_M": 16, "BLOCK_N": 128})
    dkdv = next(c for c in P.BWD_CONFIGS if c.kwargs == {"BLOCK_M": 32, "BLOCK_N": 64})
    for kernel, config, D, size in (("fwd", decode, 256, 2), ("fwd", decode, 128, 4), ("dkdv", dkdv, 256, 4)):
        assert P.loadable(kernel, [config], D, size) == [], (kernel, config, D, size)
    for D in (16, 32, 64, 128, 256):
        for size in (2, 4):
            for score_bytes in (0, 1, size, 1 + size):
                assert P.loadable("fwd", P.FWD_CONFIGS, D, size, score_bytes)
                for kernel in ("dkdv", "dq"):
                    kept = [
                        c
                        for c in P.loadable(kernel, P.BWD_CONFIGS, D, size, score_bytes)
                        if P._no_spill(c, D)
                    ]
                    assert kept, (kernel, D, size, score_bytes)
    # the plan (made here, not cached) fuses the backward only where a config that fits holds every key
    q = torch.zeros(2, 2, 64, 256)
    assert P._largest_bwd_tile("dkdv", "BLOCK_N", _args(q, q, q), 256) == 64
    assert P._make(_args(q, q, q)).bwd == "keys_fused"
