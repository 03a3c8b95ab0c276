"""``python -m vlkernels.demo``: the fused kernels against eager PyTorch on VLM-shaped problems.

Runs BLIP-2 Q-Former masked self-attention (ITM, ITG, ITC masks, padded text), a Flamingo gated
cross-attention block and a CoCa attentional pooler, fused (Triton) and eager, forward and
backward, and prints max error vs eager, time, speedup and peak memory. Without a GPU it runs
the Triton kernels under the interpreter at a small size and reports correctness only.
"""

from __future__ import annotations

import os
import sys
import time

import torch

GPU = torch.cuda.is_available()


def _reexec_under_interpreter() -> None:
    """TRITON_INTERPRET must be set before the kernels are defined: restart with it."""
    print(
        "No GPU visible: running the Triton kernels under the interpreter (TRITON_INTERPRET=1)"
        " at a small size; correctness only, no timings.",
        flush=True,
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "vlkernels.demo", *sys.argv[1:]], env)


def _cases(dtype, device):
    """(name, shape text, module or function, inputs needing grad, call) for each problem."""
    from vlkernels import masks
    from vlkernels.attention import attention
    from vlkernels.modules import AttentionalPooler, GatedCrossAttentionBlock

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    cases = []
    # BLIP-2 Q-Former: [32 queries ; text], 12 heads x 64 (GPU) — padded text
    B, H, T = (128, 12, 32) if GPU else (2, 2, 16)
    nq = 32
    q, k, v = (randn(B, H, nq + T, 64) for _ in range(3))
    text_len = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
    for mode, task in (("bidirectional", "ITM"), ("multimodal_causal", "ITG"), ("unimodal", "ITC")):
        mask = masks.qformer(nq, mode) & masks.key_padding(text_len + nq)
        cases.append(
            (
                f"Q-Former {task} ({mode})",
                f"B={B} H={H} L={nq}+{T} D=64",
                lambda m=mask: attention(q, k, v, m),
                (q, k, v),
            )
        )
    # Flamingo gated cross-attention block: text -> latents of the immediately preceding image
    B, T_txt, n_img, n_lat, dim = (8, 2048, 5, 64, 1024) if GPU else (1, 64, 2, 16, 64)
    block = GatedCrossAttentionBlock(dim=dim, dim_visual=dim, dim_head=64, heads=dim // 64 if GPU else 2)
    block = block.to(device, dtype)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    x, media = randn(B, T_txt, dim), randn(B, n_img, n_lat, dim)
    loc = torch.zeros(B, T_txt, dtype=torch.bool, device=device)
    loc[:, torch.linspace(0, T_txt - 8, n_img).long()] = True
    cases.append(
        (
            "Flamingo gated xattn block",
            f"B={B} text={T_txt} {n_img}x{n_lat} latents",
            lambda: block(x, media, loc),
            (x, media, *block.parameters()),
        )
    )
    # CoCa attentional pooler: 256 learned queries shared by the batch, head dim 96
    B, L, d, n_q = (64, 576, 768, 256) if GPU else (2, 48, 96, 16)
    pooler = AttentionalPooler(d, 1024 if GPU else 64, n_head=8 if GPU else 1, n_queries=n_q)
    pooler = pooler.to(device, dtype)
    img = randn(B, L, 1024 if GPU else 64)
    cases.append(
        (
            "CoCa attentional pooler",
            f"B={B} {n_q} queries over {L} tokens",
            lambda: pooler(img),
            (img, *pooler.parameters()),
        )
    )
    return cases


def _fwd_bwd(fn, inputs):
    out = fn()
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out) / out.numel() ** 0.5)
    return out, grads


def _time_ms(fn, inputs, reps=20) -> float:
    for _ in range(3):
        _fwd_bwd(fn, inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        _fwd_bwd(fn, inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _peak_mib(fn, inputs) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _fwd_bwd(fn, inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    import vlkernels
    from vlkernels._triton_utils import LAUNCHES

    device = torch.device("cuda" if GPU else "cpu")
    dtype = torch.bfloat16 if GPU else torch.float32
    where = torch.cuda.get_device_name() if GPU else "CPU (Triton interpreter)"
    print(f"vlkernels {vlkernels.__version__} demo on {where}, {dtype}, forward+backward", flush=True)
    cases = _cases(dtype, device)
    rows = []
    for i, (name, shape, fn, inputs) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {name}: {shape} ...", flush=True)
        t0 = time.perf_counter()
        launched = LAUNCHES["attention_fwd"]
        with vlkernels.use_backend("triton"):
            out, grads = _fwd_bwd(fn, inputs)
        assert LAUNCHES["attention_fwd"] > launched, "the Triton kernel did not run"
        with vlkernels.use_backend("torch"):
            ref, ref_grads = _fwd_bwd(fn, inputs)
        err_out = (out.float() - ref.float()).abs().max().item()
        err_grad = max(
            (a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)
        )
        row = [name, f"{err_out:.1e}", f"{err_grad:.1e}"]
        if GPU:
            with vlkernels.use_backend("triton"):
                t_f, m_f = _time_ms(fn, inputs), _peak_mib(fn, inputs)
            with vlkernels.use_backend("torch"):
                t_e, m_e = _time_ms(fn, inputs), _peak_mib(fn, inputs)
            row += [f"{t_f:.3f}", f"{t_e:.3f}", f"{t_e / t_f:.2f}x", f"{m_f:.0f}", f"{m_e:.0f}"]
        else:
            row += ["-"] * 5
        rows.append(row)
        print(f"      done in {time.perf_counter() - t0:.1f} s", flush=True)
    header = [
        "problem",
        "max err out",
        "max err grads",
        "fused ms",
        "eager ms",
        "speedup",
        "fused MiB",
        "eager MiB",
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if not GPU:
        print("\nTimings and memory need a GPU; errors are vs the eager PyTorch path (fp32).")


if __name__ == "__main__":
    if not GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        _reexec_under_interpreter()
    main()
