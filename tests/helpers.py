"""Shared test utilities: devices, every tolerance against the float64 reference, the assertions
that a backend's kernels ran, and the CPU emulation of the CUDA C++ backend."""

from __future__ import annotations

import contextlib

import torch

from benchmarks import emulated
from vlkernels import _extension
from vlkernels._triton_utils import LAUNCHES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
LOWP = (torch.float16, torch.bfloat16)
BACKENDS = ("triton", "cuda", "torch")

# ----------------------------------------------------------------------------------------------
# Tolerances of every backend against the float64 reference, per op, backend and dtype: fp32
# entries are absolute bounds (scaled by max(1, max|reference|) in check_against_reference);
# fp16/bf16 follow FlashAttention's rule for every backend: at most 2x the error of the
# same-dtype eager reference (+1e-5).
# ----------------------------------------------------------------------------------------------

FP32_TOLERANCE = {
    "attention": {"triton": 1e-5, "cuda": 1e-5, "torch": 1e-5},
    "contrastive": {"triton": 1e-4, "cuda": 1e-4, "torch": 1e-4},
    "gated_residual": {"triton": 1e-5, "cuda": 1e-5, "torch": 1e-5},
}
LOWP_SLACK = 1e-5  # the "+1e-5" of the 2x rule


def tolerance(op: str, backend: str) -> float:
    """The fp32 tolerance of ``backend`` for ``op``."""
    return FP32_TOLERANCE[op][backend]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


GRAD_FACTOR = 3  # FlashAttention's own tests: 2x for the output, 3x for dq, dk, dv


def check_against_reference(name, got, ref64, ref_lowp, dtype, op="attention", backend="triton", factor=2):
    """fp32: |got - ref64| <= tolerance * max(1, max|ref64|). fp16/bf16: at most ``factor`` times
    the error of the same-dtype eager reference (+1e-5), FlashAttention's rule (2x; its tests
    allow gradients GRAD_FACTOR, which the randomised tests use: one draw in a hundred of small
    problems puts PyTorch's own SDPA kernel 1.1x over 2x on a gradient)."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err = max_err(got, ref64)
    if dtype == torch.float32:
        bound = tolerance(op, backend) * max(1.0, ref64.abs().max().item())
    else:
        bound = factor * max_err(ref_lowp, ref64) + LOWP_SLACK
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype}, {backend})"


def padded_randn(shape, dtype, device, pad_last=8, layout_blhd=False, generator=None):
    """A view of ``shape`` [B, H, L, D] into a larger NaN-filled buffer (so any out-of-bounds read
    poisons the result); optionally stored as [B, L, H, D]."""
    B, H, L, D = shape
    buf_shape = (B, L, H, D + pad_last) if layout_blhd else (B, H, L, D + pad_last)
    buf = torch.full(buf_shape, float("nan"), dtype=dtype, device=device)
    view = buf[..., :D]
    view.copy_(torch.randn(view.shape, generator=generator).to(device=device, dtype=dtype))
    return view.transpose(1, 2) if layout_blhd else view


# ----------------------------------------------------------------------------------------------
# That the kernels ran: Triton launch counters, the C++ ops as dispatched
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def assert_launched(*names: str):
    """Fail unless every named Triton kernel (``LAUNCHES`` key) was launched inside the block."""
    before = {n: LAUNCHES[n] for n in names}
    yield
    missing = [n for n in names if LAUNCHES[n] == before[n]]
    assert not missing, f"kernels not launched: {missing}"


class _OpLog:
    """Records the names of the ops dispatched inside the block (custom ops included)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.names = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                log.append(str(func.name()))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@contextlib.contextmanager
def assert_ops_ran(*names: str):
    """Fail unless every named op (e.g. ``vlkernels::cuda_attention_fwd``) was dispatched in the block."""
    log = _OpLog()
    with log.mode:
        yield
    missing = [n for n in names if n not in log.names]
    assert not missing, f"ops not run: {missing} (ran: {sorted(set(log.names))[:20]})"


def launched(backend: str, family: str):
    """The kernel-ran assertion for ``backend``'s forward and backward of ``family``: Triton launch
    counters, the CUDA C++ ops; the torch backend has no kernel to count."""
    if backend == "triton":
        return assert_launched(f"{family}_fwd", f"{family}_bwd")
    if backend == "cuda":
        ns = _extension.get().ns
        return assert_ops_ran(f"{ns}::cuda_{family}_fwd", f"{ns}::cuda_{family}_bwd")
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The CUDA C++ backend: vlkernels._C on a GPU; elsewhere the same csrc/ kernels built with g++
# under csrc/emulate.h (CPU emulation of the execution model), registered as vlkernels_emu::*.
# ----------------------------------------------------------------------------------------------


def use_cuda_backend(monkeypatch) -> str:
    """Make backend="cuda" usable on DEVICE: the real extension on a GPU; the emulated build on the
    CPU (skips the test if neither is available). Returns the op namespace."""
    import pytest

    if ON_GPU:
        if _extension.get() is None:
            pytest.skip("vlkernels._C is not built")
        return _extension.get().ns
    if emulated.build() is None:
        pytest.skip(emulated.why())
    monkeypatch.setattr(_extension, "get", lambda: emulated.EXTENSION)
    return emulated.EXTENSION.ns


def assert_same_output_and_grads(got, got_grads, want, want_grads, names=None):
    """fp32 parity of a patched model with the unpatched one: the output within 2e-5, each
    parameter gradient within 1e-4 relative and 1e-5 of its own scale (fp32 sums), None where the
    other's is None. ``names``: the parameters', for the messages."""
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        name = names[i] if names else f"gradient {i}"
        if w is None:
            assert g is None, name
        else:
            atol = 1e-5 * max(1.0, w.abs().max().item())
            torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=name)


def seeded_dropout(monkeypatch) -> list:
    """Replace F.dropout by one whose every mask comes from a seed drawn from torch's generator,
    where vlkernels.attention draws its seed: attention probabilities [B, H, Lq, Lk] get the keep
    mask the kernels draw from that seed; any other tensor a mask that does not depend on its
    dtype. With it, an unpatched model drops what the patched one does, in any dtype. Returns the
    list of the seeds drawn for probabilities."""
    from vlkernels.attention import dropout

    drawn = []

    def seeded(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        seed = int(torch.randint(0, 2**62, ()))
        if x.dim() == 4:  # probabilities
            drawn.append(seed)
            keep = dropout.keep_mask(seed, p, *x.shape, x.device)
        else:
            keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device) >= p
        return x * keep / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", seeded)
    return drawn


def tiny_idefics():
    """transformers' IdeficsForVisionText2Text at test size (hidden 64, 2 layers, cross-attention
    in each, 16-pixel images), its tanh gates opened to 0.5 so that the cross-attention matters."""
    import transformers

    model = transformers.IdeficsForVisionText2Text(
        transformers.IdeficsConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=120,
            additional_vocab_size=2,
            alpha_initializer="zeros",  # ("normal" with alpha_type="float" crashes)
            cross_layer_interval=1,
            vision_config=dict(
                embed_dim=32,
                image_size=16,
                patch_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
            ),
            perceiver_config=dict(use_resampler=False),
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
    return model


def tiny_blip_config(layers: int = 1, **text):
    """transformers' BlipConfig at test size (hidden 32, 2 heads, 16-pixel images); ``text``: more
    text-config fields."""
    import transformers

    layer = dict(intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2)
    return transformers.BlipConfig(
        text_config=dict(hidden_size=32, vocab_size=100, encoder_hidden_size=32, **text, **layer),
        vision_config=dict(hidden_size=32, image_size=16, patch_size=8, **layer),
        projection_dim=16,
    )


def tiny_gemma_config():
    """A two-layer Gemma at test size with one key/value head (grouped queries): PaliGemma's text."""
    import transformers

    return transformers.GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=120,
    )


def tiny_paligemma(text_config):
    """transformers' PaliGemmaForConditionalGeneration at test size: a one-layer SigLIP (hidden 32,
    16-pixel images, 4 patches) and ``text_config`` (a Gemma or Gemma 2 config); image token 100."""
    import transformers

    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    cfg = transformers.PaliGemmaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=100,
        projection_dim=text_config.hidden_size,
    )
    return transformers.PaliGemmaForConditionalGeneration(cfg)


def paligemma_inputs(batch: int, n_img: int, n_prompt: int, n_suffix: int) -> dict:
    """Inputs of ``tiny_paligemma``: random ids after ``n_img`` image tokens, one image each, the
    suffix marked by token_type_ids (causal; image + prompt form the bidirectional prefix)."""
    ids = torch.randint(0, 99, (batch, n_img + n_prompt + n_suffix), device=DEVICE)
    ids[:, :n_img] = 100
    token_type = torch.zeros_like(ids)
    token_type[:, n_img + n_prompt :] = 1
    return dict(
        input_ids=ids,
        pixel_values=torch.randn(batch, 3, 16, 16, device=DEVICE),
        token_type_ids=token_type,
        attention_mask=torch.ones_like(ids),
    )


def tiny_t5(family: str = "T5", layers: int = 2, **config):
    """A tiny ``<family>ForConditionalGeneration`` (T5, MT5, UMT5): 4 heads of 8, relative bias
    of 16 buckets up to distance 10 (so that short test sequences reach the log-spaced buckets
    and go past max_distance), no dropout unless given."""
    import transformers as T

    cfg = getattr(T, f"{family}Config")(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=layers, num_decoder_layers=layers,
        num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=10,
        decoder_start_token_id=0, pad_token_id=0, **{"dropout_rate": 0.0, **config},
    )  # fmt: skip
    return getattr(T, f"{family}ForConditionalGeneration")(cfg)
