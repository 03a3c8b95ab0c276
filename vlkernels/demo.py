"""``python -m vlkernels.demo``: the fused kernels against eager PyTorch on VLM-shaped problems.

Runs BLIP-2 Q-Former masked self-attention (ITM, ITG, ITC masks, padded text), a Flamingo gated
cross-attention block and a CoCa attentional pooler at the paper workloads' sizes
(benchmarks/workloads.py: run it from the repository root), fused (Triton) and eager, forward and
backward, and prints max error vs eager, time, speedup and peak memory. Without a GPU it runs the
Triton kernels under the interpreter at a few heads and sequences (errors only), then what a CPU
can show: the CLIP loss's peak memory against open_clip's at growing N, and the torch backend's
attention time against eager's at the workloads' CPU sizes.
"""

from __future__ import annotations

import os
import sys
import time

import torch

GPU = torch.cuda.is_available()
CPU = torch.device("cpu")
CPU_LOSS_SIZES = (1000, 4000, 8000)  # N of the CLIP loss's memory on CPU


def _reexec_under_interpreter() -> None:
    """TRITON_INTERPRET must be set before the kernels are defined: restart with it."""
    print(
        "No GPU visible: running the Triton kernels under the interpreter (TRITON_INTERPRET=1)"
        " at a few heads and sequences (errors), then what a CPU can show (memory, time).",
        flush=True,
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "vlkernels.demo", *sys.argv[1:]], env)


def _cases(dtype, device):
    """(name, shape text, module or function, inputs needing grad) for each problem: the paper
    workloads of benchmarks/workloads.py on a GPU, the same at a few heads and sequences on CPU."""
    from benchmarks import workloads as W
    from vlkernels.attention import attention
    from vlkernels.modules import AttentionalPooler, GatedCrossAttentionBlock

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    cases = []
    # BLIP-2 Q-Former: [32 queries ; padded text], three masks
    for task, mode in (("itm", "bidirectional"), ("itg", "multimodal_causal"), ("itc", "unimodal")):
        w = W.WORKLOADS[f"qformer_self_{task}"]
        w = w if GPU else w.at(B=2, H=2, Hk=2)
        q, k, v = (randn(w.B, w.H, w.Lq, w.D) for _ in range(3))
        mask = w.make_mask(device)
        cases.append(
            (
                f"Q-Former {task.upper()} ({mode})",
                f"B={w.B} H={w.H} L={W.QFORMER_QUERIES}+{w.Lq - W.QFORMER_QUERIES} D={w.D}",
                lambda q=q, k=k, v=v, m=mask: attention(q, k, v, m),
                (q, k, v),
            )
        )
    # Flamingo gated cross-attention block: text -> latents of the immediately preceding image
    w = W.WORKLOADS["flamingo_immediate"]
    w = w if GPU else w.at(B=1, H=2, Hk=2, Lq=64)
    block = GatedCrossAttentionBlock(dim=w.H * w.D, dim_visual=w.H * w.D, dim_head=w.D, heads=w.H)
    block = block.to(device, dtype)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    x, media = randn(w.B, w.Lq, w.H * w.D), randn(w.B, W.FLAMINGO_IMAGES, W.FLAMINGO_LATENTS, w.H * w.D)
    t2m = W.text_to_media(w.B, w.Lq, device)
    loc = torch.ones_like(t2m, dtype=torch.bool)  # an image before the tokens whose image changes
    loc[:, 1:] = t2m[:, 1:] != t2m[:, :-1]
    cases.append(
        (
            "Flamingo gated xattn block",
            f"B={w.B} text={w.Lq} {W.FLAMINGO_IMAGES}x{W.FLAMINGO_LATENTS} latents, {w.H}x{w.D} heads",
            lambda: block(x, media, loc),
            (x, media, *block.parameters()),
        )
    )
    # CoCa attentional pooler: learned queries shared by the batch over ViT-L's image tokens (1024 wide)
    w = W.WORKLOADS["coca_pooler_hd96"]
    w, width = (w, 1024) if GPU else (w.at(B=2, H=1, Hk=1, Lq=16, Lk=48), 64)
    pooler = AttentionalPooler(w.H * w.D, width, n_head=w.H, n_queries=w.Lq).to(device, dtype)
    img = randn(w.B, w.Lk, width)
    cases.append(
        (
            "CoCa attentional pooler",
            f"B={w.B} {w.Lq} queries over {w.Lk} tokens, {w.H}x{w.D} heads",
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
    print()
    _table(header, rows)
    if not GPU:
        print("\nErrors are vs the eager PyTorch path (fp32); the kernels' timings need a GPU.")
        _cpu_memory_and_time()


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _cpu_memory_and_time() -> None:
    """What a CPU shows: the contrastive loss's peak memory against open_clip's at growing N, and
    the torch backend's attention time against eager's on the workloads at their CPU sizes."""
    import vlkernels
    from benchmarks import bench_attention, bench_contrastive
    from benchmarks import workloads as W
    from benchmarks.common import PAIRED
    from vlkernels.reference import attention_ref

    print("\nCLIP loss, CPU float32, D 256, forward + backward: the allocator's peak memory", flush=True)
    measured = bench_contrastive.cpu_memory(CPU_LOSS_SIZES, kinds=("clip",), progress=lambda s: None)
    providers = list(dict.fromkeys(m["provider"] for m in measured))
    by = {(m["N"], m["provider"]): m for m in measured}
    rows = [
        [str(N), *(f"{by[N, p]['peak_MiB']:.0f} MiB, {by[N, p]['ms']:.0f} ms" for p in providers)]
        for N in CPU_LOSS_SIZES
    ]
    _table(["N", *providers], rows)
    print("\nAttention, CPU float32, forward + backward: vlkernels' torch backend against eager", flush=True)
    fns = {
        bench_attention.OURS_CPU: lambda q, k, v, m, dense: vlkernels.attention(q, k, v, m, backend="torch"),
        "eager": lambda q, k, v, m, dense: attention_ref(q, k, v, dense),
    }
    rows = []
    for i, w in enumerate(w.at(**w.cpu) for w in W.ATTENTION if w.cpu):
        res = bench_attention.measure_cpu(fns, *bench_attention.inputs(w, i, CPU, torch.float32), quick=True)
        got = {(p, metric): v[1] for p, r in res.items() for mode, metric, v in r if mode == "full"}
        ours, eager = got[bench_attention.OURS_CPU, "ms"], got["eager", "ms"]
        paired = got[bench_attention.OURS_CPU, f"{PAIRED}eager"]
        rows.append([w.name, bench_attention.shape_text(w), f"{ours:.1f}", f"{eager:.1f}", f"{paired:.2f}x"])
    _table(["workload", "shape", "torch backend ms", "eager ms", "ratio (paired)"], rows)


if __name__ == "__main__":
    if not GPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        _reexec_under_interpreter()
    main()
