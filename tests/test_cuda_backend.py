"""What is particular to the CUDA C++ backend (csrc/, backend="cuda"); test_attention.py,
test_contrastive.py and test_gated.py run it through the same grids as the other backends.

On a GPU: vlkernels._C. Without one, the same csrc/ kernels are compiled with g++ against
csrc/emulate.h (each CUDA thread an OS thread, mma.sync and shuffles emulated per the PTX fragment
layouts) and registered as vlkernels_emu::* for CPU tensors. The registration of the real
extension (schemas, kernels, fake kernels) is checked wherever it was built.
"""

import math

import pytest
import torch
from helpers import DEVICE, use_cuda_backend

import vlkernels
from vlkernels import _extension, _schema, masks
from vlkernels.attention import cuda as cuda_attention
from vlkernels.attention.args import (
    AttentionArgs,
    AttentionGradArgs,
    AttentionLaunch,
    PlannedAttentionArgs,
    PlannedAttentionGradArgs,
)
from vlkernels.contrastive.args import RowPass, RowPassGrad, RowStats
from vlkernels.gated.args import GatedResidualArgs, GatedResidualGradArgs
from vlkernels.masks import MaskArgs


@pytest.fixture
def ns(monkeypatch):
    return use_cuda_backend(monkeypatch)


def _op(ns, name):
    return getattr(getattr(torch.ops, ns), name)


def _fwd(a: AttentionArgs, launch=None) -> tuple:
    """The C++ forward's flat arguments: ``a`` and its plan's launch decisions (or ``launch``)."""
    return _schema.flatten(PlannedAttentionArgs(a, launch or cuda_attention.launch(a)))


def _bwd(g: AttentionGradArgs, launch=None) -> tuple:
    return _schema.flatten(PlannedAttentionGradArgs(g, launch or cuda_attention.launch(g.fwd)))


def test_attention_op_checks_inputs_on_the_cpp_side(ns):
    op = _op(ns, "cuda_attention_fwd")
    q = torch.randn(1, 2, 8, 16, device=DEVICE)

    def call(q, k, v, **mask):
        return op(*_fwd(AttentionArgs(q, k, v, MaskArgs(**mask), 0.25)))

    with pytest.raises(RuntimeError, match="attention_fwd: q must be float16, bfloat16 or float32, got Int"):
        call(q.int(), q, q)
    with pytest.raises(RuntimeError, match="attention_fwd: head dim must be a multiple of 8 in"):
        call(q[..., :12], q[..., :12], q[..., :12])
    with pytest.raises(RuntimeError, match="attention_fwd: k must be Float, got Half"):
        call(q, q.half(), q)
    with pytest.raises(RuntimeError, match=r"attention_fwd: the CUDA C\+\+ kernels take no float bias"):
        call(q, q, q, bias=torch.zeros(1, 1, 8, 8, device=DEVICE))
    starts = torch.zeros(1, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(RuntimeError, match="attention_fwd: row_lo and row_hi come together"):
        call(q, q, q, row_lo=starts)
    with pytest.raises(RuntimeError, match="attention_fwd: row_hi must be int32, got Long"):
        call(q, q, q, row_lo=starts, row_hi=starts.long() + 8)
    with pytest.raises(RuntimeError, match=r"attention_fwd: softcap must be finite and >= 0, got -1"):
        op(*_fwd(AttentionArgs(q, q, q, MaskArgs(), 0.25, -1.0)))
    seed = torch.tensor(5, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"attention_fwd: dropout_p must be in \[0, 1\], got 1.5"):
        op(*_fwd(AttentionArgs(q, q, q, MaskArgs(), 0.25, 0.0, 1.5, seed)))
    with pytest.raises(RuntimeError, match="attention_fwd: dropout needs a seed"):
        op(*_fwd(AttentionArgs(q, q, q, MaskArgs(), 0.25, 0.0, 0.5, None)))
    with pytest.raises(RuntimeError, match="attention_fwd: seed must be one int64 element, got Int"):
        op(*_fwd(AttentionArgs(q, q, q, MaskArgs(), 0.25, 0.0, 0.5, seed.int())))
    lengths = torch.tensor([3], device=DEVICE)
    with pytest.raises(RuntimeError, match="attention_fwd: key_lengths must be int32, got Long"):
        call(q, q, q, key_lengths=lengths)


def test_attention_op_checks_the_plans_launch_arguments(ns):
    """Launch decisions that would leave keys or batch entries out are refused, not run."""
    fwd, bwd = _op(ns, "cuda_attention_fwd"), _op(ns, "cuda_attention_bwd")
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    k = torch.randn(3, 2, 300, 16, device=DEVICE)
    a = AttentionArgs(q, k, k, MaskArgs(), 0.25)
    want = cuda_attention.launch(a)
    assert want.splits > 1 and want.keys_per_split % 64 == 0 and want.dq_chunks * want.per_chunk >= 3
    out, lse = fwd(*_fwd(a))
    bwd(*_bwd(AttentionGradArgs(torch.ones_like(out), out, lse, a)))
    for bad in (want._replace(keys_per_split=100), want._replace(splits=2, keys_per_split=64)):
        with pytest.raises(RuntimeError, match="attention_fwd: splits and keys_per_split must be 1 or cover"):
            fwd(*_fwd(a, bad))
    grad = AttentionGradArgs(torch.ones_like(out), out, lse, a)
    cover = "attention_bwd: dq_chunks and per_chunk must cover the batch of 3,"
    with pytest.raises(RuntimeError, match=cover):
        bwd(*_bwd(grad, want._replace(dq_chunks=1, per_chunk=2)))
    unshared = a._replace(q=q.expand(3, -1, -1, -1))
    with pytest.raises(RuntimeError, match="one entry per chunk"):
        fwd(*_fwd(unshared, AttentionLaunch(1, 0, 1, 3)))


def test_attention_opcheck_and_compile(ns):
    q, k, v = (torch.randn(2, 2, 17, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([17, 5], dtype=torch.int32, device=DEVICE)
    args = AttentionArgs(
        q.detach(), k.detach(), v.detach(), MaskArgs(key_lengths=lengths, causal=True), 1 / math.sqrt(32)
    )
    torch.library.opcheck(_op(ns, "cuda_attention_fwd").default, _fwd(args))
    tracked = args._replace(q=q, k=k, v=v)  # its autograd kernel (C++) too
    torch.library.opcheck(_op(ns, "cuda_attention_fwd").default, _fwd(tracked))
    out, lse = _op(ns, "cuda_attention_fwd")(*_fwd(args))
    grad_args = AttentionGradArgs(torch.randn_like(out), out, lse, args)
    torch.library.opcheck(_op(ns, "cuda_attention_bwd").default, _bwd(grad_args))
    dense = torch.rand(2, 1, 17, 17, device=DEVICE) > 0.3
    dense_args = args._replace(mask=MaskArgs(dense_mask=dense))
    torch.library.opcheck(_op(ns, "cuda_attention_mask_span").default, _fwd(dense_args))

    for mask in (masks.causal(), dense):  # a dense mask: its spans' op is traced too

        def f(q, k, v, mask=mask):
            return vlkernels.attention(q, k, v, mask, backend="cuda").sum()

        compiled = torch.compile(f, fullgraph=True)
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
        want = torch.autograd.grad(f(q, k, v), (q, k, v))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


def test_attention_backward_is_recorded_in_cpp(ns):
    """backend="cuda" runs no Python autograd Function: the forward op's autograd kernel records
    the backward (a C++ node), which checks that its saved inputs, the mask's included, were not
    modified in place since the forward, and refuses a double backward."""
    q, k, v = (torch.randn(2, 2, 9, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    dense = torch.rand(2, 1, 9, 9, device=DEVICE) > 0.3
    out = vlkernels.attention(q, k, v, dense, backend="cuda")
    assert "AttentionFn" in out.grad_fn.name()
    with torch.no_grad():
        assert vlkernels.attention(q, k, v, dense, backend="cuda").grad_fn is None
    with torch.inference_mode():
        assert not vlkernels.attention(q, k, v, dense, backend="cuda").requires_grad
    dense[0, 0, 0, 0] = not dense[0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_dense_mask_spans_computed_once_per_call(ns):
    """A dense mask's row spans are computed once per call, by the span op that the forward's
    autograd kernel calls, for the forward, the backward and the position bias's gradient; the
    backward ops compute none themselves, and without the spans they give the same gradients (they
    only read more keys)."""
    q, k, v = (torch.randn(2, 2, 21, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    dense = torch.rand(2, 1, 21, 21, device=DEVICE) > 0.4
    dense[0, :, 3] = False  # a row with nothing to attend
    dense[1, :, :, 15:] = False  # spans that end before the last key tile
    table = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    position = vlkernels.bias.t5(table, bidirectional=True, num_buckets=8, max_distance=16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # the op calls
        out = vlkernels.attention(q, k, v, dense, position_bias=position, backend="cuda")
        out.sum().backward()
    calls = [e.name for e in prof.events() if e.name.startswith(f"{ns}::")]
    assert calls.count(f"{ns}::cuda_attention_mask_span") == 1, calls
    assert calls.count(f"{ns}::cuda_attention_bwd") == calls.count(f"{ns}::cuda_attention_position_grad") == 1

    args = AttentionArgs(q.detach(), k.detach(), v.detach(), MaskArgs(dense_mask=dense), 0.25)
    lo, hi = _op(ns, "cuda_attention_mask_span")(*_fwd(args))
    assert lo[0, 3] >= hi[0, 3] and (hi[1] <= 15).all()
    spanned = args._replace(mask=args.mask._replace(row_lo=lo, row_hi=hi))
    out, lse = _op(ns, "cuda_attention_fwd")(*_fwd(spanned))
    grad_out = torch.randn_like(out)
    got = _op(ns, "cuda_attention_bwd")(*_bwd(AttentionGradArgs(grad_out, out, lse, args)))
    want = _op(ns, "cuda_attention_bwd")(*_bwd(AttentionGradArgs(grad_out, out, lse, spanned)))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_gated_residual_opcheck(ns):
    x = torch.randn(3, 1001, device=DEVICE)
    gate = torch.tensor([0.3], device=DEVICE)
    torch.library.opcheck(
        _op(ns, "cuda_gated_residual_fwd").default,
        _schema.flatten(GatedResidualArgs(x, torch.randn_like(x), gate)),
    )
    torch.library.opcheck(
        _op(ns, "cuda_gated_residual_bwd").default,
        _schema.flatten(GatedResidualGradArgs(x, torch.randn_like(x), gate)),
    )


def test_contrastive_ops_opcheck(ns):
    rows, cols = (torch.randn(n, 1, 24, device=DEVICE) for n in (19, 19))
    neg = torch.randn(5, 24, device=DEVICE)
    s = torch.tensor([10.0], device=DEVICE)
    fwd = RowPass(rows, cols, s, neg=neg)
    torch.library.opcheck(_op(ns, "cuda_contrastive_fwd").default, _schema.flatten(fwd))
    st = RowStats.of(_op(ns, "cuda_contrastive_fwd")(*_schema.flatten(fwd)))
    grad = RowPassGrad(
        fwd, st.lse, lse_col=st.lse, other=True, w_own=0.1, w_other=0.1, n_cls_own=24, n_cls_other=19
    )
    torch.library.opcheck(_op(ns, "cuda_contrastive_bwd").default, _schema.flatten(grad))
    with pytest.raises(RuntimeError, match="contrastive_fwd: kind must be 'clip' or 'siglip', got 'x'"):
        _op(ns, "cuda_contrastive_fwd")(*_schema.flatten(fwd._replace(kind="x")))


# -- the real extension: registration and fake kernels (CI builds it without a GPU) -------------


def _built_extension():
    ext = _extension.get()
    if ext is None:
        pytest.skip("vlkernels._C is not built here (no CUDA toolkit, or VLK_SKIP_CUDA_BUILD=1)")
    return ext


def test_extension_registers_every_declared_op_with_its_schema():
    ext = _built_extension()
    assert "sm_" in ext.archs
    names = {op.name for op in _extension._DECLARED}
    assert names == {
        f"cuda_{f}_{d}" for f in ("attention", "gated_residual", "contrastive") for d in ("fwd", "bwd")
    } | {"cuda_attention_position_grad", "cuda_attention_mask_span"}
    for op in _extension._DECLARED:
        handle = getattr(torch.ops.vlkernels, op.name).default
        assert str(handle._schema) == f"vlkernels::{op.name}{_schema.schema(op.args, op.returns)}", op.name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA"), op.name


def test_extension_fake_kernels_give_shapes_and_dtypes():
    _built_extension()
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.vlkernels
    with FakeTensorMode():
        q = torch.empty(1, 4, 19, 72, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(3, 2, 50, 72, dtype=torch.bfloat16, device="cuda")
        fwd = AttentionArgs(q, k, k, MaskArgs(), 0.1)
        shared = AttentionLaunch(1, 0, 1, 3)  # one dq chunk of the 3 batch entries
        out, lse = ops.cuda_attention_fwd(*_fwd(fwd, shared))
        assert out.shape == (3, 4, 19, 72) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        assert lse.shape == (3, 4, 19) and out.transpose(1, 2).is_contiguous()
        dq, dk, dv = ops.cuda_attention_bwd(*_bwd(AttentionGradArgs(out, out, lse, fwd), shared))
        assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dq.dtype == torch.bfloat16
        x = torch.empty(2, 7, 16, dtype=torch.float16, device="cuda")
        gate = torch.empty(1, device="cuda")
        assert ops.cuda_gated_residual_fwd(x, x, gate).shape == x.shape
        dy, dg = ops.cuda_gated_residual_bwd(x, x, gate)
        assert dy.shape == x.shape and dg.shape == gate.shape
        rows = torch.empty(9, 32, 256, dtype=torch.float16, device="cuda")
        cols = torch.empty(9, 1, 256, dtype=torch.float16, device="cuda")
        fwd = RowPass(rows, cols, gate)
        st = ops.cuda_contrastive_fwd(*_schema.flatten(fwd))
        assert st.shape == (5, 9) and st.dtype == torch.float32
        grad = RowPassGrad(
            fwd, st[0], lse_col=st[0], other=True, w_own=0.1, w_other=0.1, n_cls_own=9, n_cls_other=9
        )
        dr, dsb = ops.cuda_contrastive_bwd(*_schema.flatten(grad))
        assert dr.shape == rows.shape and dr.dtype == torch.float16 and dsb.shape == (4,)
