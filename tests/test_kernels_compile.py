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

from vlkernels.attention import plan

SMEM_KERNELS = {"_attn_fwd": "fwd", "_attn_bwd_dkdv": "dkdv", "_attn_bwd_dq": "dq"}


def _smem_bound(ln):
    """The plan's upper bound on the launch's shared memory (attention's tiled kernels), else None."""
    from triton import Config

    if ln.name not in SMEM_KERNELS:
        return None
    config = Config({"BLOCK_M": ln.args["BLOCK_M"], "BLOCK_N": ln.args["BLOCK_N"]}, **ln.options)
    return plan.smem_bound(SMEM_KERNELS[ln.name], config, **plan.bound_kwargs(ln.args))


def _record(run_launchers, all_configs=False):
    """The launches ``run_launchers()`` makes (with every autotune config the kernel's prune keeps:
    one job per config), as picklable compile jobs (module, kernel name, signature, constants,
    attributes, options, shared-memory bound)."""
    from benchmarks import static

    with static.recording(all_configs) as rec:
        run_launchers()
    jobs = []
    for ln in rec.launches:
        tiles = {n: v for n, v in ln.args.items() if n.startswith("BLOCK_")}
        bound = _smem_bound(ln)
        jobs.append((ln.kernel.__module__, ln.name, *static.signature(ln), ln.options, tiles, bound))
    return jobs


def _launchers(arch_dtypes):
    """Run every launcher once per (dtype, variant) on fake CUDA tensors."""
    from benchmarks.static import fake_cuda
    from vlkernels.attention import triton as attn
    from vlkernels.attention.args import AttentionArgs, AttentionGradArgs
    from vlkernels.contrastive import triton as ctr
    from vlkernels.contrastive.args import LossArgs, LossGradArgs, RowPass, RowPassGrad
    from vlkernels.gated import triton as gated
    from vlkernels.gated.args import GatedResidualArgs, GatedResidualGradArgs
    from vlkernels.masks import MaskArgs

    def run():
        with fake_cuda():
            dev = "cuda"
            for dtype, variant, backward, head_dim in arch_dtypes:
                # the backward's three paths: one key tile holds every key, one query tile every
                # query (one query head per key head), or neither (shared queries: always)
                Lq, Lk, Hk = {
                    "keys_fused": (64, 64, 2),
                    "queries_fused": (48, 100, 4),
                    "split": (100, 100, 2),
                }[backward]
                B, H, D = 2, 4, head_dim
                q = torch.empty(1 if variant == "mixed" else B, H, Lq, D, dtype=dtype, device=dev)
                k = torch.empty(B, Hk, Lk, D, dtype=dtype, device=dev)
                i32 = torch.empty(B, dtype=torch.int32, device=dev)
                i64 = torch.empty(B, dtype=torch.int64, device=dev)
                mask = {
                    "all_on": MaskArgs(
                        torch.empty(B, 1, Lq, Lk, dtype=torch.bool, device=dev),
                        i64,
                        i32,
                        torch.empty(B, Lq, dtype=torch.int32, device=dev),
                        True,
                        8,
                        2,
                        1,
                        16,
                        bias=torch.empty(1, H, Lq, Lk, dtype=dtype, device=dev),
                        row_lo=torch.empty(B, Lq, dtype=torch.int64, device=dev),
                        row_hi=torch.empty(B, Lq, dtype=torch.int64, device=dev),
                        row_run=torch.empty(B, Lq, dtype=torch.uint8, device=dev),
                        position_bias=torch.empty(H, 32, dtype=dtype, device=dev),  # T5's table
                        position_buckets=torch.empty(257, dtype=torch.int32, device=dev),
                        position_shift=3,
                    ),
                    "off": MaskArgs(),
                    "mixed": MaskArgs(
                        text_to_media=torch.empty(B, Lq, dtype=torch.int32, device=dev),
                        causal=True,
                        qformer_queries=8,
                        qformer_mode=1,
                        media_mode=2,
                        latents_per_media=16,
                        row_lo=torch.empty(B, Lq, dtype=torch.int64, device=dev),
                        row_hi=torch.empty(B, Lq, dtype=torch.int64, device=dev),
                        position_bias=torch.empty(B, H, dtype=torch.float32, device=dev),  # ALiBi's slopes
                    ),
                }[variant]
                on = variant == "all_on"  # soft-capping and dropout too
                seed = torch.empty((), dtype=torch.int64, device=dev)  # the dropout seed: a device tensor
                a = AttentionArgs(q, k, k, mask, 0.125, 50.0 if on else 0.0, 0.1 if on else 0.0, seed)
                if on:  # a dense bool mask's span and runs, a float bias's span
                    for live in (torch.empty(B, 1, Lq, Lk, dtype=torch.bool, device=dev), mask.bias):
                        attn._with_span(a._replace(mask=MaskArgs(dense_mask=live)))
                out, lse = attn._forward(a)
                attn._backward(AttentionGradArgs(out, out, lse, a))
                if variant == "all_on":  # the float bias's gradient
                    attn._bias_grad(AttentionGradArgs(out, out, lse, a))
                if variant != "off":  # the position bias's: T5's table, ALiBi's slopes
                    attn._position_grad(AttentionGradArgs(out, out, lse, a))
                if variant != "mixed":  # decoding: one query row over 4096 keys, split and combined
                    long_k = torch.empty(B, Hk, 4096, D, dtype=dtype, device=dev)
                    dec_mask = (
                        MaskArgs(key_lengths=i64, causal=True, window=1024) if variant == "all_on" else mask
                    )
                    attn._forward(a._replace(q=q[:, :, :1], k=long_k, v=long_k, mask=dec_mask))

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
                # the fused loss: queues, smoothing and a bias / SigLIP / max over queries, D > 64
                feats = torch.empty(96, 256, dtype=dtype, device=dev)
                loss_args = {
                    "all_on": LossArgs(feats, feats, scale, scale, feats[:40], feats[:50], smooth=0.1),
                    "off": LossArgs(feats, feats, scale, scale, kind="siglip"),
                    "mixed": LossArgs(torch.empty(96, 5, 256, dtype=dtype, device=dev), feats, scale),
                }[variant]
                loss, stats = ctr._loss_forward(loss_args)
                ctr._loss_backward(LossGradArgs(loss, stats, loss_args))

                x = torch.empty(3, 1000, dtype=dtype, device=dev)
                gated._forward(GatedResidualArgs(x, x, scale))
                gated._backward(GatedResidualGradArgs(x, x, scale))

    return run


# (arch, dtype, variant, attention backward, head dim): every mask part, every contrastive variant,
# each path of the attention backward, on each dtype and target; head dim 256 for the largest tiles
VARIANTS = [
    (90, torch.bfloat16, "all_on", "keys_fused", 128),
    (90, torch.bfloat16, "off", "queries_fused", 64),
    (80, torch.float16, "mixed", "split", 64),
    (90, torch.float32, "off", "split", 64),
    (90, torch.float16, "all_on", "queries_fused", 128),
    (90, torch.bfloat16, "off", "split", 256),
]
# bytes: an A100's opt-in maximum per block, and an H100's (the limit the kernels' prunes use)
SMEM_PER_BLOCK = {80: 166912, 90: plan.SMEM_PER_BLOCK}


def _compile(job):
    import importlib

    from triton.runtime.autotuner import Autotuner

    from benchmarks import static

    module, name, sig, constexprs, attrs, options, tiles, bound, arch = job
    fn = getattr(importlib.import_module(module), name)
    if isinstance(fn, Autotuner):
        fn = fn.fn
    t0 = time.perf_counter()
    k = static.compile_signature(fn, sig, constexprs, attrs, options, arch)
    assert k.asm.get("cubin"), name
    shared, limit = k.metadata.shared, SMEM_PER_BLOCK[arch]
    what = f"{name} {tiles} {options} sm_{arch}: {shared} B shared (bound {bound})"
    wrong = shared > limit or (bound is not None and shared > bound)
    return f"{what}, {time.perf_counter() - t0:.1f} s", wrong


def main(all_configs: bool):
    from concurrent.futures import ProcessPoolExecutor

    jobs, launches = [], 0
    for arch, *variant in VARIANTS:
        jobs += [(*j, arch) for j in _record(_launchers([variant]), all_configs)]
        launches += len(_record(_launchers([variant])))
    wrong = []
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for line, past in pool.map(_compile, jobs):
            print(line, flush=True)
            wrong += [line] * past
    limits = ", ".join(f"sm_{a} {n} B" for a, n in SMEM_PER_BLOCK.items())
    assert not wrong, f"shared memory past a block's ({limits}) or the plan's bound:\n" + "\n".join(wrong)
    import triton

    print(f"compiled {len(jobs)} kernels ({launches} launches) with triton {triton.__version__}")


def _tritons():
    """This environment's Triton, and the GPU machine's (VLK_GPU_TRITON_PATH: a directory with
    another triton package; the Makefile installs 3.6.0 there), with every autotune config: the
    benchmarks on the GPU autotune over them."""
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
    """Every launch compiles; every config within the target's shared memory per block and, for
    attention's tiled kernels, within the plan's bound (``plan.smem_bound``, which prunes the
    configs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ imports from there
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, root, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, __file__] + (["--all-configs"] if triton_path else [])
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    # per variant: attention fwd and its backward (fused: 1; split: delta, dk/dv, dq, and with
    # shared queries the sum of the dq partials; with a float bias its gradient, with a position
    # bias its; decoding's split forward and combine; the mask span kernel); contrastive row
    # fwd, bwd (a second bwd for "off"); the fused loss: bands, finish, two bwd, finish; gated fwd, bwd, dgate
    def attention(variant, backward):
        decode = 2 * (variant != "mixed")  # split forward and combine
        spans = 2 * (variant == "all_on")  # the span kernel for a bool mask and for a float bias
        bias_grad, position_grad = variant == "all_on", variant != "off"
        return (
            1
            + (1 if backward != "split" else 3 + (variant == "mixed"))
            + bias_grad
            + position_grad
            + decode
            + spans
        )

    n = sum(attention(v, bw) + 2 + (v == "off") + 5 + 3 for _, _, v, bw, _ in VARIANTS)
    assert f"({n} launches)" in out.stdout, out.stdout


if __name__ == "__main__":
    main("--all-configs" in sys.argv)
