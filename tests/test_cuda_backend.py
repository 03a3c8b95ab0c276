"""The CUDA C++ backend (csrc/, backend="cuda").

On a GPU: vlkernels._C. Without one, the same csrc/ kernels are compiled with g++ against
csrc/emulate.h (each CUDA thread an OS thread, mma.sync and shuffles emulated per the PTX fragment
layouts) and registered as vlkernels_emu::* for CPU tensors, so CI runs the kernels' indexing,
masking and reductions against the float64 reference; the GPU run checks the real thing. The
registration of the real extension (schemas, fake kernels) is checked wherever it was built.
"""

import math

import pytest
import torch
from helpers import DEVICE, LOWP, ON_GPU, launched, use_cuda_backend
from test_attention import MASKS, _shapes, run_case

import vlkernels
from vlkernels import _dispatch, masks
from vlkernels.reference import attention_ref, gated_residual_ref


@pytest.fixture
def ns(monkeypatch):
    return use_cuda_backend(monkeypatch)


# -- attention: the Triton test grid through backend="cuda" ------------------------------------


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_attention_every_mask_fp32(ns, mask_name):
    shapes = _shapes(mask_name)
    for i, shape in enumerate(shapes if ON_GPU else shapes[:3]):
        run_case(shape, mask_name, torch.float32, seed=i, backend="cuda", ns=ns)


CPU_LOWP_MASKS = ["none", "dense", "causal&key_padding", "qformer_unimodal&pad", "media_all_previous"]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("mask_name", list(MASKS) if ON_GPU else CPU_LOWP_MASKS)
def test_attention_low_precision_two_x_rule(ns, mask_name, dtype):
    shapes = _shapes(mask_name) if ON_GPU else [(2, 1, 4, 2, 45, 64, 64)]
    for i, shape in enumerate(shapes):
        run_case(shape, mask_name, dtype, seed=200 + i, backend="cuda", ns=ns)


@pytest.mark.parametrize("D", [16, 40, 128, 136, 256])
def test_attention_head_dims_and_blhd_views(ns, D):
    """Every head-dim instantiation (32, 64, 128, 256 rounded) and [B, L, H, D] views."""
    run_case((2, 2, 2, 1, 33, 70, D), "causal&key_padding", torch.float32, seed=D, backend="cuda", ns=ns)
    run_case((1, 1, 2, 2, 20, 20, D), "none", torch.float16, seed=D, layout_blhd=True, backend="cuda", ns=ns)


def test_attention_qformer_whole_problem_and_fully_masked_rows(ns):
    """The Q-Former's 32 queries + 32 text tokens; rows with nothing to attend give 0 and 0 grads."""
    B, H, L, D = 3, 2, 64, 64
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = masks.qformer(32, "multimodal_causal") & masks.key_padding(
        torch.tensor([64, 40, 0], device=DEVICE)
    )
    with launched("cuda", "attention", ns):
        out = vlkernels.attention(q, k, v, mask, backend="cuda")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(out[2] == 0) and all(torch.all(g[2] == 0) for g in grads)
    ref = attention_ref(q, k, v, mask, upcast=True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=2e-5, atol=2e-5)


def test_attention_shared_queries_sum_dq_over_batch(ns):
    B, H, Lq, Lk, D = 5, 2, 9, 30, 32
    q = torch.randn(1, H, Lq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, device=DEVICE) for _ in range(2))
    (dq,) = torch.autograd.grad(vlkernels.attention(q, k, v, backend="cuda").sum(), (q,))
    qe = q.detach().expand(B, H, Lq, D).clone().requires_grad_()
    (dqe,) = torch.autograd.grad(attention_ref(qe, k, v, upcast=True).sum(), (qe,))
    torch.testing.assert_close(dq.double(), dqe.double().sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_attention_op_checks_inputs_on_the_cpp_side(ns):
    op = getattr(torch.ops, ns).attention_fwd
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    mask_args = (None, None, None, None, False, 0, 0, 0, 1, 0.25)
    with pytest.raises(RuntimeError, match="attention_fwd: q must be float16, bfloat16 or float32, got Int"):
        op(q.int(), q, q, *mask_args)
    with pytest.raises(RuntimeError, match="attention_fwd: head dim must be a multiple of 8 in"):
        op(q[..., :12], q[..., :12], q[..., :12], *mask_args)
    with pytest.raises(RuntimeError, match="attention_fwd: k must be Float, got Half"):
        op(q, q.half(), q, *mask_args)
    lengths = torch.tensor([3], device=DEVICE)
    with pytest.raises(RuntimeError, match="attention_fwd: key_lengths must be int32, got Long"):
        op(q, q, q, None, lengths, None, None, False, 0, 0, 0, 1, 0.25)


def test_attention_opcheck_and_compile(ns):
    op = getattr(torch.ops, ns).attention_fwd
    q, k, v = (torch.randn(2, 2, 17, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([17, 5], dtype=torch.int32, device=DEVICE)
    args = (q, k, v, None, lengths, None, None, True, 0, 0, 0, 1, 1 / math.sqrt(32))
    torch.library.opcheck(op.default, args)

    def f(q, k, v):
        return vlkernels.attention(q, k, v, masks.causal(), backend="cuda").sum()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# -- gated residual ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_residual(ns, dtype):
    x, y = (torch.randn(3, 1001, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    gate = torch.tensor([0.3], device=DEVICE, requires_grad=True)
    with launched("cuda", "attention_gated_residual", ns):
        out = vlkernels.gated_residual(x, y, gate, backend="cuda")
        grads = torch.autograd.grad(out, (x, y, gate), torch.ones_like(out))
    ref = gated_residual_ref(x, y, gate)
    ref_grads = torch.autograd.grad(ref, (x, y, gate), torch.ones_like(ref))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 100)
    torch.library.opcheck(getattr(torch.ops, ns).attention_gated_residual_fwd.default, (x, y, gate))


# -- contrastive row passes (test_contrastive.py runs the losses through backend="cuda") ---------


def test_contrastive_ops_opcheck(ns):
    ops = getattr(torch.ops, ns)
    rows, cols = (torch.randn(n, 1, 24, device=DEVICE) for n in (19, 19))
    neg = torch.randn(5, 24, device=DEVICE)
    s = torch.tensor([10.0], device=DEVICE)
    torch.library.opcheck(ops.contrastive_fwd.default, (rows, None, cols, neg, s, None, "clip", 0, 0))
    st = ops.contrastive_fwd(rows, None, cols, neg, s, None, "clip", 0, 0)
    args = (
        rows,
        None,
        cols,
        neg,
        s,
        None,
        st[0],
        None,
        st[0],
        "clip",
        True,
        True,
        0,
        0,
        0.1,
        0.1,
        0.0,
        24,
        19,
        0.0,
    )
    torch.library.opcheck(ops.contrastive_bwd.default, args)
    with pytest.raises(RuntimeError, match="contrastive_fwd: kind must be 'clip' or 'siglip', got 'x'"):
        ops.contrastive_fwd(rows, None, cols, neg, s, None, "x", 0, 0)


# -- the real extension: registration and fake kernels (CI builds it without a GPU) -------------

SCHEMAS = {
    "attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor? dense_mask, Tensor? key_lengths, "
    "Tensor? prefix_lengths, Tensor? text_to_media, bool causal, int qformer_queries, int qformer_mode, "
    "int media_mode, int latents_per_media, float scale) -> (Tensor, Tensor)",
    "attention_bwd": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? dense_mask, Tensor? key_lengths, Tensor? prefix_lengths, Tensor? text_to_media, bool causal, "
    "int qformer_queries, int qformer_mode, int media_mode, int latents_per_media, float scale) "
    "-> (Tensor, Tensor, Tensor)",
    "attention_gated_residual_fwd": "(Tensor x, Tensor y, Tensor gate) -> Tensor",
    "attention_gated_residual_bwd": "(Tensor grad_out, Tensor y, Tensor gate) -> (Tensor, Tensor)",
    "contrastive_fwd": "(Tensor rows, Tensor? rows_m, Tensor cols, Tensor? neg, Tensor scale, Tensor? bias, "
    "str kind, int row_off, int col_off) -> Tensor",
    "contrastive_bwd": "(Tensor rows, Tensor? rows_m, Tensor cols, Tensor? neg, Tensor scale, Tensor? bias, "
    "Tensor lse_row, Tensor? lsem_row, Tensor? lse_col, str kind, bool own, bool other, int row_off, "
    "int col_off, float w_own, float w_other, float smooth, int n_cls_own, int n_cls_other, float alpha) "
    "-> (Tensor, Tensor)",
}


def _built_extension():
    ext = _dispatch.cuda_extension()
    if ext is None:
        pytest.skip("vlkernels._C is not built here (no CUDA toolkit, or VLK_SKIP_CUDA_BUILD=1)")
    return ext


def test_extension_registers_every_op_with_its_schema():
    ext = _built_extension()
    assert "sm_" in ext.ARCHS
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.vlkernels, name).default
        assert str(op._schema) == f"vlkernels::{name}{schema}", name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name


def test_extension_fake_kernels_give_shapes_and_dtypes():
    _built_extension()
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.vlkernels
    with FakeTensorMode():
        q = torch.empty(1, 4, 19, 72, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(3, 2, 50, 72, dtype=torch.bfloat16, device="cuda")
        out, lse = ops.attention_fwd(q, k, k, None, None, None, None, False, 0, 0, 0, 1, 0.1)
        assert out.shape == (3, 4, 19, 72) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        assert lse.shape == (3, 4, 19) and out.transpose(1, 2).is_contiguous()
        dq, dk, dv = ops.attention_bwd(out, q, k, k, out, lse, None, None, None, None, False, 0, 0, 0, 1, 0.1)
        assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dq.dtype == torch.bfloat16
        x = torch.empty(2, 7, 16, dtype=torch.float16, device="cuda")
        gate = torch.empty(1, device="cuda")
        assert ops.attention_gated_residual_fwd(x, x, gate).shape == x.shape
        dy, dg = ops.attention_gated_residual_bwd(x, x, gate)
        assert dy.shape == x.shape and dg.shape == gate.shape
        rows = torch.empty(9, 32, 256, dtype=torch.float16, device="cuda")
        cols = torch.empty(9, 1, 256, dtype=torch.float16, device="cuda")
        st = ops.contrastive_fwd(rows, None, cols, None, gate, None, "clip", 0, 0)
        assert st.shape == (5, 9) and st.dtype == torch.float32
        dr, dsb = ops.contrastive_bwd(
            rows,
            None,
            cols,
            None,
            gate,
            None,
            st[0],
            None,
            st[0],
            "clip",
            True,
            True,
            0,
            0,
            0.1,
            0.1,
            0.0,
            9,
            9,
            0.0,
        )
        assert dr.shape == rows.shape and dr.dtype == torch.float16 and dsb.shape == (4,)
