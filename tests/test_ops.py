"""torch.library registration (opcheck, torch.compile), the argument declarations, backend
dispatch, and bad-input errors."""

import dataclasses
import typing

import pytest
import torch
from helpers import DEVICE, ON_GPU, assert_launched

import vlkernels
from vlkernels import _dispatch, _extension, _schema, bias, masks
from vlkernels.attention.args import AttentionArgs, AttentionGradArgs, AttentionLaunch
from vlkernels.masks import MaskArgs
from vlkernels.reference import attention_ref


def _qkv(B=2, H=2, Lq=20, Lk=24, D=32, Bq=None, Hk=None, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(Bq or B, H, Lq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hk or H, Lk, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hk or H, Lk, D, generator=g).to(DEVICE, dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _op_args(mask_kind) -> AttentionArgs:
    q, k, v = _qkv(Bq=1 if mask_kind == "shared" else None, Hk=1, grad=False)
    lengths = torch.tensor([10, 24], dtype=torch.int32, device=DEVICE)
    t2m = torch.tensor([[0] * 5 + [1] * 15, [1] * 10 + [3] * 10], dtype=torch.int32, device=DEVICE)
    table = torch.randn(32, 2, device=DEVICE)  # a T5 table [num_buckets, H]
    cases = {
        "none": MaskArgs(),
        "shared": MaskArgs(causal=True),
        "dense": MaskArgs(dense_mask=torch.rand(2, 1, 20, 24, device=DEVICE) > 0.5),
        "qformer": MaskArgs(key_lengths=lengths, qformer_queries=8, qformer_mode=1),
        "prefix": MaskArgs(prefix_lengths=lengths, causal=True),
        "media": MaskArgs(text_to_media=t2m, media_mode=1, latents_per_media=8),
        "bias": MaskArgs(bias=torch.randn(2, 1, 20, 24, device=DEVICE)),
        "t5": MaskArgs(causal=True, **bias.lower(bias.t5(table, False), 2, 2, 20, 24, DEVICE)),
        "alibi": MaskArgs(**bias.lower(bias.alibi(table[0].abs()), 2, 2, 20, 24, DEVICE)),
    }
    return AttentionArgs(q, k, v, cases[mask_kind], 0.2)


@pytest.mark.parametrize(
    "mask_kind", ["none", "shared", "dense", "qformer", "prefix", "media", "bias", "t5", "alibi"]
)
def test_opcheck_attention(mask_kind):
    """The backend ops have no autograd of their own (vlkernels.attention's autograd function sits
    above the backends): opcheck's schema, fake-tensor and AOT-dispatch checks."""
    torch.library.opcheck(torch.ops.vlkernels.triton_attention_fwd, _schema.flatten(_op_args(mask_kind)))


def test_opcheck_attention_backward_and_gated_residual():
    args = _op_args("qformer")
    out, lse = torch.ops.vlkernels.triton_attention_fwd(*_schema.flatten(args))
    grad = AttentionGradArgs(torch.randn_like(out), out, lse, args)
    torch.library.opcheck(torch.ops.vlkernels.triton_attention_bwd, _schema.flatten(grad))
    args = _op_args("bias")
    out, lse = torch.ops.vlkernels.triton_attention_fwd(*_schema.flatten(args))
    grad = AttentionGradArgs(torch.randn_like(out), out, lse, args)
    torch.library.opcheck(torch.ops.vlkernels.triton_attention_bias_grad, _schema.flatten(grad))
    for kind in ("t5", "alibi"):
        args = _op_args(kind)
        out, lse = torch.ops.vlkernels.triton_attention_fwd(*_schema.flatten(args))
        grad = AttentionGradArgs(torch.randn_like(out), out, lse, args)
        torch.library.opcheck(torch.ops.vlkernels.triton_attention_position_grad, _schema.flatten(grad))
    x = torch.randn(3, 5, 7, device=DEVICE)
    gate = torch.tensor([0.3], device=DEVICE)
    torch.library.opcheck(torch.ops.vlkernels.triton_gated_residual_fwd, (x, torch.randn_like(x), gate))
    torch.library.opcheck(torch.ops.vlkernels.triton_gated_residual_bwd, (x, torch.randn_like(x), gate))


def test_schemas_are_derived_from_the_declarations():
    """Each op's arguments are declared once, as a NamedTuple: its schema is that list, nested
    tuples flattened in place, and flatten / unflatten go between the tuple and an op call."""
    assert _schema.schema(MaskArgs, "()") == (
        "(Tensor? dense_mask, Tensor? key_lengths, Tensor? prefix_lengths, Tensor? text_to_media, "
        "bool causal, int qformer_queries, int qformer_mode, int media_mode, int latents_per_media, "
        "int window, Tensor? bias, Tensor? row_lo, Tensor? row_hi, Tensor? row_run, Tensor? position_bias, "
        "Tensor? position_buckets, int position_shift) -> ()"
    )
    fwd = str(torch.ops.vlkernels.triton_attention_fwd.default._schema)
    assert fwd.startswith("vlkernels::triton_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? dense_mask,")
    assert fwd.endswith(
        "int latents_per_media, int window, Tensor? bias, Tensor? row_lo, Tensor? row_hi, Tensor? row_run, "
        "Tensor? position_bias, Tensor? position_buckets, int position_shift, float scale, float softcap, "
        "float dropout_p, Tensor? seed) -> (Tensor, Tensor)"
    )
    for name in ("attention", "contrastive", "gated_residual"):  # the Triton and C++ ops share a declaration
        for direction in ("fwd", "bwd"):
            handle = getattr(torch.ops.vlkernels, f"triton_{name}_{direction}").default
            cpp = next(o for o in _extension._DECLARED if o.name == f"cuda_{name}_{direction}")
            args = cpp.args
            if name == "attention":  # the C++ ops take the plan's launch decisions after them
                args, launch = typing.get_type_hints(cpp.args).values()
                assert launch is AttentionLaunch
                assert _schema.fields(cpp.args) == _schema.fields(args) + _schema.fields(AttentionLaunch)
            schema = _schema.schema(args, cpp.returns)
            assert str(handle._schema) == f"vlkernels::triton_{name}_{direction}{schema}"
    args = _op_args("media")
    assert _schema.unflatten(AttentionArgs, _schema.flatten(args)) == args
    with pytest.raises(TypeError, match="unique once flattened"):
        from typing import NamedTuple

        class Twice(NamedTuple):
            a: MaskArgs
            b: MaskArgs

        _schema.fields(Twice)


def test_torch_compile_fullgraph_forward_backward():
    q, k, v = _qkv(Hk=1)
    lengths = torch.tensor([12, 24], device=DEVICE)
    gate = torch.tensor([0.5], device=DEVICE, requires_grad=True)

    def f(q, k, v, gate):
        o = vlkernels.attention(q, k, v, masks.qformer(8, "unimodal") & masks.key_padding(lengths))
        return vlkernels.gated_residual(q, o, gate).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    with assert_launched("attention_fwd", "attention_bwd", "gated_residual_fwd", "gated_residual_bwd"):
        loss = compiled(q, k, v, gate)
        grads = torch.autograd.grad(loss, (q, k, v, gate))
    ref_grads = torch.autograd.grad(f(q, k, v, gate), (q, k, v, gate))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_backend_selection_and_reasons(monkeypatch):
    q, k, v = _qkv(grad=False)
    with vlkernels.use_backend("torch"):
        assert vlkernels.get_backend() == "torch"
        torch.testing.assert_close(vlkernels.attention(q, k, v), attention_ref(q, k, v))
    assert vlkernels.get_backend() is None
    if not ON_GPU:
        with pytest.raises(vlkernels.BackendUnavailableError, match="needs CUDA tensors, got cpu"):
            vlkernels.attention(q, k, v, backend="cuda")
    monkeypatch.setattr(_extension, "get", lambda: None)
    with pytest.raises(vlkernels.BackendUnavailableError, match=r"vlkernels\._C is not built"):
        vlkernels.attention(q, k, v, backend="cuda")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="backend must be one of"):
        vlkernels.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="backend must be one of"):
        vlkernels.set_backend("xformers")
    if not ON_GPU:
        # automatic choice on CPU: Triton under the interpreter, the eager reference otherwise
        with assert_launched("attention_fwd"):
            vlkernels.attention(q, k, v)
        # the interpreter switched after import: Triton defined the kernels for the other mode
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(
            vlkernels.BackendUnavailableError, match="TRITON_INTERPRET was unset after vlkernels"
        ):
            vlkernels.attention(q, k, v, backend="triton")
        torch.testing.assert_close(vlkernels.attention(q, k, v), attention_ref(q, k, v))
    monkeypatch.setattr(_dispatch, "_INTERPRETER_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(
        vlkernels.BackendUnavailableError, match="TRITON_INTERPRET was set after vlkernels was"
    ):
        vlkernels.attention(q, k, v, backend="triton")


def test_dispatch_reads_each_backends_capabilities(monkeypatch):
    """A backend's limits are its Capabilities (data): the one not_supported_reasons reads them
    against the call's needs, so changing the data changes the answer and nothing else does."""
    q, k, v = _qkv(D=40, grad=False)
    a = AttentionArgs(q, k, v, MaskArgs(bias=torch.zeros(2, 1, 20, 24, device=DEVICE)), 1.0)
    cuda = _dispatch.backends("attention")["cuda"]
    why = lambda: [r for r in _dispatch.not_supported_reasons("attention", cuda, a) if "kernels" in r]
    assert why() == ["the CUDA C++ kernels take no float bias (a float attn_mask)"]
    monkeypatch.setattr(cuda, "caps", dataclasses.replace(cuda.caps, without=(), head_dims=(16, 32, 8)))
    assert why() == ["the CUDA C++ kernels take head dims that are multiples of 8 in [16, 32], got 40"]
    monkeypatch.setattr(cuda, "caps", dataclasses.replace(cuda.caps, max_grid_axis=1))
    assert why()[-1].endswith("(a grid axis each), got batch 2, q heads 2, k/v heads 2")
    for family in ("attention", "contrastive", "contrastive_rows", "gated_residual"):
        for backend in _dispatch.backends(family).values():
            assert isinstance(backend.caps, _dispatch.Capabilities), (family, backend)


def test_no_backend_fits_lists_every_reason(monkeypatch):
    q, k, v = _qkv(grad=False)
    torch_backend = _dispatch.backends("attention")["torch"]
    monkeypatch.setattr(torch_backend, "caps", dataclasses.replace(torch_backend.caps, dtypes=()))
    monkeypatch.setattr(_extension, "get", lambda: None)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(vlkernels.BackendUnavailableError) as info:
        vlkernels.attention(q, k, v)
    msg = str(info.value)
    assert msg.startswith("attention: no backend can serve these inputs: triton: ")
    assert (
        r"cuda: " in msg
        and "vlkernels._C is not built" in msg
        and "torch: the torch backend computes in , got torch.float32" in msg
    )


def test_info_runs(capsys):
    from vlkernels import info

    info.main()
    out = capsys.readouterr().out
    assert "triton" in out and "torch" in out and "cuda" in out


BAD_INPUTS = [
    (lambda q, k, v: ([q], k, v, None), TypeError, "q must be a torch.Tensor, got list"),
    (
        lambda q, k, v: (q[0], k, v, None),
        ValueError,
        r"q must be 4-D \[B, H, L, D\], got shape \[2, 20, 32\]",
    ),
    (
        lambda q, k, v: (q.double(), k.double(), v.double(), None),
        TypeError,
        "q must be float16, bfloat16 or float32, got torch.float64",
    ),
    (lambda q, k, v: (q.half(), k, v, None), TypeError, "must share a dtype"),
    (lambda q, k, v: (q, k, v[:, :, :5], None), ValueError, "k and v must have the same shape"),
    (
        lambda q, k, v: (torch.cat([q, q[:1]]), k, v, None),
        ValueError,
        r"q batch must be 2 \(the batch of k\) or 1, got 3",
    ),
    (lambda q, k, v: (q[..., :16], k, v, None), ValueError, r"q head dim must equal k's \(32\), got 16"),
    (
        lambda q, k, v: (q[:, :1].expand(2, 3, 20, 32), k, v, None),
        ValueError,
        r"q heads \(3\) must be a multiple of k/v heads \(2\)",
    ),
    (
        lambda q, k, v: (q, k[:, :0], v[:, :0], None),
        ValueError,
        r"head counts must be >= 1, got q \[\d+, \d+, \d+, \d+\], k \[\d+, 0,",
    ),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0], None), ValueError, "head dim must be >= 1, got 0"),
    (
        lambda q, k, v: (q, k, v, torch.ones(2, 1, 20, 24, dtype=torch.int32)),
        TypeError,
        r"a tensor mask must be bool \(True = may attend\) or float \(added to the scores\), got torch.int32",
    ),
    (
        lambda q, k, v: (q, k, v, torch.ones(2, 1, 20, 23, dtype=torch.bool)),
        ValueError,
        r"mask must broadcast to \[B, H, Lq, Lk\] = \[2, 2, 20, 24\]",
    ),
    (
        lambda q, k, v: (q, k, v, "causal"),
        TypeError,
        "mask must be None, a bool tensor, a float tensor or a vlkernels.masks mask",
    ),
    (
        lambda q, k, v: (q, k, v, masks.key_padding(torch.tensor([3]))),
        ValueError,
        r"key_padding lengths must have shape \[B\]",
    ),
    (
        lambda q, k, v: (q, k, v, masks.media(torch.zeros(2, 19, dtype=torch.long), 4)),
        ValueError,
        r"text_to_media must have shape \[B, Lq\]",
    ),
    (
        lambda q, k, v: (q, k, v, masks.media(torch.zeros(2, 20, dtype=torch.long), 5)),
        ValueError,
        "multiple of latents_per_media=5, got 24",
    ),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise_clear_errors(case):
    make, exc, msg = BAD_INPUTS[case]
    q, k, v = (t.cpu() for t in _qkv(grad=False))
    with pytest.raises(exc, match=msg):
        vlkernels.attention(*make(q, k, v), backend="torch")
    with pytest.raises(TypeError, match="scale must be a float"):
        vlkernels.attention(q, k, v, scale="0.1")


def test_bad_device_mix_and_gated_residual_errors():
    q, k, v = (t.cpu() for t in _qkv(grad=False))
    if ON_GPU:
        with pytest.raises(ValueError, match="must be on one device"):
            vlkernels.attention(q, k.cuda(), v)
    with pytest.raises(ValueError, match="gate must have one element"):
        vlkernels.gated_residual(q, q, torch.ones(2))
    with pytest.raises(ValueError, match="x and y must match"):
        vlkernels.gated_residual(q, k, torch.ones(1))
    with pytest.raises(TypeError, match=r"y must be a torch\.Tensor"):
        vlkernels.gated_residual(q, 1.0, torch.ones(1))


def test_public_submodules_are_attributes():
    """What the README shows: ``import vlkernels`` is enough for the modules and losses."""
    import vlkernels as vk

    assert vk.modules.AttentionalPooler and vk.losses.ClipLoss and vk.reference.attention_ref
    assert vk.masks.sliding_window and callable(vk.attention) and callable(vk.contrastive_loss)
    assert vk.bias.t5 and vk.bias.alibi


@pytest.mark.parametrize("op", ["attention", "contrastive_loss", "gated_residual"])
def test_double_backward_raises_clearly(backend, op):
    g = torch.Generator().manual_seed(5)
    if op == "attention":
        inputs = [torch.randn(2, 2, 9, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
        call = lambda: vlkernels.attention(*inputs, backend=backend).sum()
    elif op == "contrastive_loss":
        inputs = [torch.randn(6, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
        inputs.append(torch.tensor(5.0, device=DEVICE, requires_grad=True))
        call = lambda: vlkernels.contrastive_loss(*inputs, backend=backend)
    else:
        inputs = [torch.randn(3, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
        inputs.append(torch.tensor([0.3], device=DEVICE, requires_grad=True))
        call = lambda: vlkernels.gated_residual(*inputs, backend=backend).sum()
    with pytest.raises(RuntimeError, match=f"{op}: double backward \\(create_graph=True\\) is not supported"):
        torch.autograd.grad(call(), inputs, create_graph=True)
    assert all(t is not None for t in torch.autograd.grad(call(), inputs))  # first order still works


def test_torch_compile_fullgraph_torch_backend():
    """The torch backend traces into one graph too (its mask reuse and host checks stay out)."""
    q, k, v = (torch.randn(2, 3, 24, 16, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([12, 0])  # batch entry 1 has no key: empty rows

    def f(q, k, v):
        m = masks.qformer(8, "unimodal") & masks.key_padding(lengths)
        return vlkernels.attention(q, k, v, m, backend="torch").square().sum()

    grads = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    ref = masks.qformer(8, "unimodal") & masks.key_padding(lengths)
    want = attention_ref(q.double(), k.double(), v.double(), ref.to_dense(2, 24, 24)).square().sum()
    for g, r in zip(grads, torch.autograd.grad(want, (q, k, v)), strict=True):
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


def test_compiled_training_step_with_dropout_draws_anew_each_step(backend):
    """Dropout's seed is drawn on the device as a tensor (seed=None): a training step compiled with
    fullgraph=True has no graph break, is compiled once, each step drops other entries, and
    torch.manual_seed repeats them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))

    def step(q, k, v):
        return vlkernels.attention(q, k, v, masks.causal(), dropout_p=0.3, backend=backend).sum()

    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(0)
    losses = []
    for _ in range(3):
        loss = compiled(q, k, v)
        loss.backward()
        losses.append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert len(set(losses)) == 3  # a new keep mask each step
    torch.manual_seed(0)
    assert [compiled(q, k, v).item() for _ in range(3)] == losses


def test_csrc_codes_are_the_python_enums():
    """The codes and layouts both sides of the C++ ops use: csrc/vlk.h's QFormerMode, MediaMode
    and LossKind have the names and values of vlkernels.masks.QFormerMode / MediaMode and
    vlkernels.contrastive.args.LossKind; its RowStat and ScaleBiasSum, the fields of RowStats and
    ScaleBiasSums in their order, then their count."""
    import pathlib
    import re

    from vlkernels.contrastive.args import LossKind, RowStats, ScaleBiasSums

    header = (pathlib.Path(__file__).parents[1] / "csrc" / "vlk.h").read_text()

    def declared(name):
        body = re.search(rf"enum {name} : int {{([^}}]*)}}", header).group(1)
        return dict(re.findall(r"(\w+) = (\d+)", body))

    for enum, prefix in ((masks.QFormerMode, "QFORMER_"), (masks.MediaMode, "MEDIA_"), (LossKind, "LOSS_")):
        assert declared(enum.__name__) == {prefix + m.name: str(m.value) for m in enum}
    layouts = [(RowStats, "RowStat", "STAT_", "ROW_STATS")]
    layouts.append((ScaleBiasSums, "ScaleBiasSum", "SUM_", "SCALE_BIAS_SUMS"))
    for layout, name, prefix, count in layouts:
        want = {prefix + f.upper(): str(i) for i, f in enumerate(layout._fields)}
        assert declared(name) == {**want, count: str(len(layout._fields))}
