"""Contrastive-loss benchmarks: vlkernels against open_clip's ClipLoss / SigLipLoss and Inf-CL.

GPU: forward+backward time, peak memory and achieved TFLOP/s (on the 6·N²·D FLOPs of the
logits GEMM and its two gradient GEMMs) against a bf16 matmul measured in the same run.
CPU: peak memory of one forward+backward at growing N, each in a fresh process — vlkernels'
must grow linearly, open_clip's grows as N² — and the median time of three more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
    out["vlkernels-triton" if device.type == "cuda" else "vlkernels-torch"] = lambda x, y, s, b: (
        vlkernels.contrastive_loss(x, y, s, b if kind == "siglip" else None, kind=kind)
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


_CPU_PROBE = textwrap.dedent("""
    import resource, sys, time, torch
    kind, provider, N, D = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    x = torch.nn.functional.normalize(torch.randn(N, D), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D), dim=-1).requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    from benchmarks.bench_contrastive import providers
    fn = providers(kind, torch.device("cpu"))[provider]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(x, y, s, b).backward()
    mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn(x, y, s, b).backward()
        times.append((time.perf_counter() - t0) * 1e3)
    print(mib, sorted(times)[1])
""")


def _run_cpu(quick: bool, progress, rows: list) -> None:
    from benchmarks.common import environment

    env = environment()
    sizes = [500, 2000] if quick else [1000, 2000, 4000, 8000, 16000]
    penv = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind in ("clip", "siglip"):
        for name, fn in providers(kind, torch.device("cpu")).items():
            if isinstance(fn, str):
                progress(f"skip {name}: {fn}")
                continue
            for N in sizes:
                progress(f"{kind} N={N} D=256 {name}: peak memory, time")
                out = subprocess.run(
                    [sys.executable, "-c", _CPU_PROBE, kind, name, str(N), "256"],
                    capture_output=True,
                    text=True,
                    env=penv,
                    cwd=root,
                )
                if out.returncode:
                    progress(f"    failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                mib, ms = map(float, out.stdout.strip().splitlines()[-1].split())
                for metric, value in (("peak_MiB", mib), ("ms", ms)):
                    rows.append(
                        dict(
                            op=f"contrastive_{kind}",
                            provider=name,
                            mode="full",
                            shape=f"N={N} D=256",
                            dtype="float32",
                            metric=metric,
                            p20=value,
                            p50=value,
                            p80=value,
                            **env,
                        )
                    )


def run(quick: bool, progress=print, rows=None) -> list[dict]:
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    (_run_gpu if torch.cuda.is_available() else _run_cpu)(quick, progress, rows)
    return rows
