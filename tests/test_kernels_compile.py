"""Every Triton kernel compiles to a cubin for sm_80 and sm_90, with the arguments its launcher
passes on a GPU: the CPU counterpart of the GPU test run, which the interpreter cannot replace (it
does not type-check the way the compiler does).

In a subprocess without TRITON_INTERPRET, the launchers run on fake CUDA tensors with Triton's
launch replaced by a recorder (benchmarks/static.py); each recorded launch (namedtuple arguments,
compile-time constants, the first autotune config) is then compiled for its target.
"""

import os
import subprocess
import sys
import time

import pytest
import torch


def _record(run_launchers):
    """The launches ``run_launchers()`` makes, as picklable compile jobs (module, kernel name,
    signature, constants, options)."""
    from benchmarks import static

    with static.recording() as rec:
        run_launchers()
    return [(ln.kernel.__module__, ln.name, *static.signature(ln), ln.options) for ln in rec.launches]


def _launchers(arch_dtypes):
    """Run every launcher once per (dtype, variant) on fake CUDA tensors."""
    from benchmarks.static import fake_cuda
    from vlkernels.attention import triton as attn
    from vlkernels.attention.args import AttentionArgs, AttentionGradArgs
    from vlkernels.contrastive import triton as ctr
    from vlkernels.contrastive.args import RowPass, RowPassGrad
    from vlkernels.gated import triton as gated
    from vlkernels.gated.args import GatedResidualArgs, GatedResidualGradArgs
    from vlkernels.masks import MaskArgs

    def run():
        with fake_cuda():
            dev = "cuda"
            for dtype, variant in arch_dtypes:
                B, H, L, D = 2, 4, 64, 128 if variant == "all_on" else 64
                q = torch.empty(1 if variant == "mixed" else B, H, L, D, dtype=dtype, device=dev)
                k = torch.empty(B, 2, L, D, dtype=dtype, device=dev)
                i32 = torch.empty(B, dtype=torch.int32, device=dev)
                mask = {
                    "all_on": MaskArgs(
                        torch.empty(B, 1, L, L, dtype=torch.bool, device=dev),
                        i32,
                        i32,
                        torch.empty(B, L, dtype=torch.int32, device=dev),
                        True,
                        8,
                        2,
                        1,
                        16,
                    ),
                    "off": MaskArgs(),
                    "mixed": MaskArgs(
                        text_to_media=torch.empty(B, L, dtype=torch.int32, device=dev),
                        causal=True,
                        qformer_queries=8,
                        qformer_mode=1,
                        media_mode=2,
                        latents_per_media=16,
                    ),
                }[variant]
                a = AttentionArgs(q, k, k, mask, 0.125)
                out, lse = attn._forward(a)
                attn._backward(AttentionGradArgs(out, out, lse, a))

                rows = torch.empty(96, 1, 256, dtype=dtype, device=dev)
                scale = torch.empty(1, dtype=torch.float32, device=dev)
                fwd = {
                    "all_on": RowPass(rows, rows, scale, scale, rows[:40, 0], rows_m=rows),
                    "off": RowPass(rows, rows, scale, scale, kind="siglip"),
                    "mixed": RowPass(torch.empty(96, 5, 256, dtype=dtype, device=dev), rows, scale),
                }[variant]
                st = ctr._forward(fwd)
                ctr._backward(RowPassGrad(fwd, st[0], st[3], st[0], own=True, other=variant == "mixed"))
                if variant == "off":
                    ctr._backward(
                        RowPassGrad(fwd._replace(kind="clip"), st[0], None, st[0], own=False, other=True)
                    )

                x = torch.empty(3, 1000, dtype=dtype, device=dev)
                gated._forward(GatedResidualArgs(x, x, scale))
                gated._backward(GatedResidualGradArgs(x, x, scale))

    return run


# (arch, dtype, variant): every mask part, every contrastive variant, on each dtype and target
VARIANTS = [
    (90, torch.bfloat16, "all_on"),
    (90, torch.bfloat16, "off"),
    (80, torch.float16, "mixed"),
    (90, torch.float32, "off"),
    (90, torch.float16, "all_on"),
]


def _compile(job):
    import importlib

    from triton.runtime.autotuner import Autotuner

    from benchmarks import static

    module, name, sig, constexprs, options, arch = job
    fn = getattr(importlib.import_module(module), name)
    if isinstance(fn, Autotuner):
        fn = fn.fn
    t0 = time.perf_counter()
    k = static.compile_signature(fn, sig, constexprs, options, arch)
    assert k.asm.get("cubin"), name
    return f"{name} sm_{arch}: {time.perf_counter() - t0:.1f} s"


def main():
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for arch, dtype, variant in VARIANTS:
        jobs += [(*j, arch) for j in _record(_launchers([(dtype, variant)]))]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for line in pool.map(_compile, jobs):
            print(line, flush=True)
    import triton

    print(f"compiled {len(jobs)} kernels with triton {triton.__version__}")


def _tritons():
    """This environment's Triton, and the GPU machine's (VLK_GPU_TRITON_PATH: a directory with
    another triton package; the Makefile installs 3.6.0 there)."""
    extra = os.environ.get("VLK_GPU_TRITON_PATH", "")
    return [
        None,
        pytest.param(
            extra,
            id="gpu-triton",
            marks=pytest.mark.skipif(
                not os.path.isdir(os.path.join(extra, "triton")),
                reason="VLK_GPU_TRITON_PATH has no triton package",
            ),
        ),
    ]


@pytest.mark.parametrize("triton_path", _tritons())
def test_every_kernel_compiles_for_sm80_and_sm90(triton_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ imports from there
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # per variant: attention fwd, delta, dk/dv, dq; contrastive fwd, bwd (a second bwd for "off");
    # gated fwd, bwd
    n = 8 * len(VARIANTS) + sum(v == "off" for _, _, v in VARIANTS)
    assert f"compiled {n} kernels" in out.stdout, out.stdout


if __name__ == "__main__":
    main()
