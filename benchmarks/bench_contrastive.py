"""Contrastive-loss benchmarks: vlkernels against open_clip's ClipLoss / SigLipLoss and Inf-CL.

GPU: forward+backward time, peak memory and achieved TFLOP/s (on the 6·N²·D FLOPs of the
logits GEMM and its two gradient GEMMs) against a bf16 matmul measured in the same run.
CPU: the allocator's peak memory over one forward+backward at growing N — vlkernels' grows
linearly past its row chunks of 2**22 logits, open_clip's grows as N² — and the median time of
three more.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import vlkernels


def _open_clip_losses():
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        return None
    return {"clip": ClipLoss(), "siglip": SigLipLoss()}


def providers(kind: str, device) -> dict:
    """name -> function(x, y, scale, bias) -> loss, or a string saying why it is skipped."""
    out = {}
    backend = "triton" if device.type == "cuda" else "torch"  # on CPU, under the interpreter too
    out[f"vlkernels-{backend}"] = lambda x, y, s, b: vlkernels.contrastive_loss(
        x, y, s, b if kind == "siglip" else None, kind=kind, backend=backend
    )
    oc = _open_clip_losses()
    if oc is None:
        out["open_clip"] = "not installed"
    elif kind == "clip":
        out["open_clip"] = lambda x, y, s, b: oc["clip"](x, y, s)
    else:
        out["open_clip"] = lambda x, y, s, b: oc["siglip"](x, y, s, b)
    if kind == "clip":
        try:
            from inf_cl import cal_inf_loss

            out["inf-cl"] = lambda x, y, s, b: (
                (cal_inf_loss(x, y, scale=s).mean() + cal_inf_loss(y, x, scale=s).mean()) / 2
            )
        except ImportError:
            out["inf-cl"] = "not installed"
        if device.type != "cuda" and not isinstance(out["inf-cl"], str):
            out["inf-cl"] = "needs a GPU"
    return out


CPU_SIZES = {True: (1000, 4000), False: (1000, 2000, 4000, 8000, 16000)}  # quick, full


def matmul_ceiling_tflops() -> float:
    """bf16 8192³ GEMM throughput measured now (the ceiling TFLOP/s are compared with)."""
    import triton

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, warmup=10, rep=50)
    return 2 * 8192**3 / ms / 1e9


def _run_gpu(quick: bool, progress, rows: list) -> None:
    from benchmarks.common import environment, peak_mib, time_ms

    env = environment()
    ceiling = matmul_ceiling_tflops()
    progress(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")
    rows.append(
        dict(
            op="matmul_8192",
            provider="torch",
            mode="forward",
            shape="8192^3",
            dtype="bfloat16",
            metric="TFLOP/s",
            p20=ceiling,
            p50=ceiling,
            p80=ceiling,
            **env,
        )
    )
    sizes = [4096, 16384, 32768] if quick else [4096, 8192, 16384, 32768, 65536]
    for kind in ("clip", "siglip"):
        provs = providers(kind, torch.device("cuda"))
        for D in [768] if quick else [512, 768, 1024]:
            for N in sizes:
                g = torch.Generator(device="cuda").manual_seed(N)
                x = (
                    F.normalize(torch.randn(N, D, device="cuda", generator=g), dim=-1)
                    .bfloat16()
                    .requires_grad_()
                )
                y = (
                    F.normalize(torch.randn(N, D, device="cuda", generator=g), dim=-1)
                    .bfloat16()
                    .requires_grad_()
                )
                s = torch.tensor(100.0, device="cuda", requires_grad=True)
                b = torch.tensor(-10.0, device="cuda", requires_grad=True)
                for name, fn in provs.items():
                    if isinstance(fn, str):
                        continue
                    progress(f"{kind} N={N} D={D} {name}")
                    full = lambda: torch.autograd.grad(fn(x, y, s, b), (x, y))  # noqa: B023
                    try:
                        p20, p50, p80 = time_ms(full, quick)
                        mem = peak_mib(full)
                    except torch.OutOfMemoryError:
                        progress("    out of memory")
                        torch.cuda.empty_cache()
                        continue
                    shape = f"N={N} D={D}"
                    base = dict(op=f"contrastive_{kind}", provider=name, shape=shape, dtype="bfloat16", **env)
                    tflops = 6 * N * N * D / p50 / 1e9
                    rows += [
                        dict(base, mode="full", metric="ms", p20=p20, p50=p50, p80=p80),
                        dict(base, mode="full", metric="peak_MiB", p20=mem, p50=mem, p80=mem),
                        dict(base, mode="full", metric="TFLOP/s", p20=tflops, p50=tflops, p80=tflops),
                    ]


def cpu_memory(sizes, kinds=("clip", "siglip"), progress=print) -> list[dict]:
    """Per (kind, N in ``sizes``, provider) on CPU, float32, D 256: the allocator's peak above what
    was held before (MiB) over one forward + backward, and the median ms of three more."""
    from benchmarks.common import cpu_peak_mib

    out = []
    g = torch.Generator().manual_seed(0)
    for kind in kinds:
        fns = providers(kind, torch.device("cpu"))
        for name, why in ((n, f) for n, f in fns.items() if isinstance(f, str)):
            progress(f"skip {name}: {why}")
        for N in sizes:
            x, y = (F.normalize(torch.randn(N, 256, generator=g), dim=-1).requires_grad_() for _ in range(2))
            s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
            for name, fn in ((n, f) for n, f in fns.items() if not isinstance(f, str)):
                progress(f"{kind} N={N} D=256 {name}: peak memory, time")
                step = lambda fn=fn, a=(x, y, s, b): torch.autograd.grad(fn(*a), a[:2])
                mib = cpu_peak_mib(step)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
                out.append(dict(kind=kind, N=N, provider=name, peak_MiB=mib, ms=sorted(times)[1]))
    return out


def _run_cpu(quick: bool, progress, rows: list) -> None:
    from benchmarks.common import environment

    env = environment()
    for m in cpu_memory(CPU_SIZES[quick], progress=progress):
        for metric in ("peak_MiB", "ms"):
            rows.append(
                dict(
                    op=f"contrastive_{m['kind']}",
                    provider=m["provider"],
                    mode="full",
                    shape=f"N={m['N']} D=256",
                    dtype="float32",
                    metric=metric,
                    p20=m[metric],
                    p50=m[metric],
                    p80=m[metric],
                    **env,
                )
            )


def run(quick: bool, progress=print, rows=None) -> list[dict]:
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    (_run_gpu if torch.cuda.is_available() else _run_cpu)(quick, progress, rows)
    return rows
