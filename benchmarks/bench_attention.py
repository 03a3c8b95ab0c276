"""Attention benchmarks: Q-Former self-attention (3 masks), Q-Former cross-attention, Flamingo
text-to-media cross-attention, CoCa pooler — vlkernels-triton against eager PyTorch, SDPA with a
boolean mask, FlexAttention (compiled, block mask) and xformers where installed. On CPU without
the Triton interpreter: vlkernels' torch backend against SDPA and eager, float32, timed on CPU.

Every provider computes the same attention on the same inputs; a provider that is missing or
cannot run a case is skipped with a note.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import vlkernels
from benchmarks import workloads as W
from vlkernels.reference import attention_ref

OURS_CPU = "vlkernels-torch"  # on CPU without the interpreter: the torch backend


# the workloads of benchmarks/workloads.py this benchmark runs (on a GPU: at their sizes, --quick:
# at their quick batch; on CPU without the interpreter: at their CPU sizes)
BENCHMARKED = (
    "qformer_self_itm",
    "qformer_self_itg",
    "qformer_self_itc",
    "qformer_cross",
    "flamingo_immediate",
    "flamingo_all_previous",
    "coca_pooler_hd64",
    "coca_pooler_hd96",
)


def shape_text(w: W.Attention) -> str:
    return f"q[{w.Bq},{w.H},{w.Lq},{w.D}] kv[{w.B},{w.Hk},{w.Lk},{w.D}]"


def _cpu_timing(device) -> bool:
    """CPU tensors and no interpreter: the torch backend is what runs, and is timed."""
    from vlkernels._dispatch import interpreter_on

    return device.type == "cpu" and not interpreter_on()


def cases(quick: bool, device) -> list[W.Attention]:
    declared = [W.WORKLOADS[name] for name in BENCHMARKED]
    if _cpu_timing(device):
        return [w.at(**w.cpu) for w in declared if w.cpu]
    if device.type == "cpu":  # the interpreter (quick): the mechanics at a few heads, untimed
        return [
            W.WORKLOADS["qformer_self_itg"].at(B=2, H=2, Hk=2),
            W.WORKLOADS["flamingo_immediate"].at(B=1, H=2, Hk=2, Lq=32),
            W.WORKLOADS["coca_pooler_hd96"].at(B=2, H=2, Hk=2, Lq=16, Lk=20),
        ]
    return [w.at(B=w.quick_batch) if quick and w.quick_batch else w for w in declared]


def providers(device) -> dict[str, Callable | str]:
    """name -> function(q, k, v, mask, dense) or a string saying why it is skipped."""
    out: dict[str, Callable | str] = {
        "vlkernels-triton": lambda q, k, v, m, dense: vlkernels.attention(q, k, v, m, backend="triton"),
        "eager": lambda q, k, v, m, dense: attention_ref(q, k, v, dense),
        "sdpa-bool-mask": lambda q, k, v, m, dense: F.scaled_dot_product_attention(
            q.expand(k.shape[0], -1, -1, -1), k, v, attn_mask=dense
        ),
    }
    if _cpu_timing(device):
        out["vlkernels-triton"] = "needs a GPU or TRITON_INTERPRET=1 (untimed)"
        out[OURS_CPU] = lambda q, k, v, m, dense: vlkernels.attention(q, k, v, m, backend="torch")
    if device.type != "cuda":
        out["flex-attention"] = "needs a GPU (compiled)"
        out["xformers"] = "needs a GPU"
        return out
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def run_flex(q, k, v, m, dense, _cache={}):  # noqa: B006 (block masks cached per case)
            key = id(dense)
            if key not in _cache:
                dm = dense[:, 0]
                t0 = time.perf_counter()
                _cache.clear()
                _cache[key] = create_block_mask(
                    lambda b, h, i, j: dm[b, i, j],
                    dense.shape[0],
                    None,
                    dense.shape[2],
                    dense.shape[3],
                    device=q.device,
                )
                torch.cuda.synchronize()
                run_flex.block_mask_ms = (time.perf_counter() - t0) * 1e3
            return flex(q.expand(k.shape[0], -1, -1, -1), k, v, block_mask=_cache[key])

        out["flex-attention"] = run_flex
    except ImportError as e:
        out["flex-attention"] = f"not available ({e})"
    try:
        import xformers.ops as xops

        def run_xformers(q, k, v, m, dense):
            bias = torch.zeros(dense.shape, dtype=q.dtype, device=q.device).masked_fill(~dense, float("-inf"))
            bias = bias.expand(k.shape[0], q.shape[1], -1, -1)
            t = lambda x: x.expand(k.shape[0], -1, -1, -1).transpose(1, 2)  # [B, L, H, D]
            return xops.memory_efficient_attention(t(q), t(k), t(v), attn_bias=bias).transpose(1, 2)

        out["xformers"] = run_xformers
    except ImportError:
        out["xformers"] = "not installed"
    return out


def _measure(fn, q, k, v, mask, dense, quick) -> list[tuple[str, str, tuple]]:
    """(mode, metric, (p20, p50, p80)) for forward, backward, forward+backward and peak memory."""
    from benchmarks.common import peak_mib, time_ms

    fwd = lambda: fn(q, k, v, mask, dense)
    out = fwd()
    do = torch.randn_like(out)
    bwd = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    full = lambda: torch.autograd.grad(fwd(), (q, k, v), do)
    res = [
        (mode, "ms", time_ms(f, quick)) for mode, f in (("forward", fwd), ("backward", bwd), ("full", full))
    ]
    mem = peak_mib(full)
    res.append(("full", "peak_MiB", (mem, mem, mem)))
    if hasattr(fn, "block_mask_ms"):
        res.append(("create_block_mask", "ms", (fn.block_mask_ms,) * 3))
    return res


def inputs(case: W.Attention, ci: int, device, dtype):
    """q, k, v (requiring grad), the case's mask and its dense bool form [B, 1, Lq, Lk]."""
    g = torch.Generator().manual_seed(ci)
    q = torch.randn(case.Bq, case.H, case.Lq, case.D, generator=g).to(device, dtype).requires_grad_()
    k, v = (
        torch.randn(case.B, case.H, case.Lk, case.D, generator=g).to(device, dtype).requires_grad_()
        for _ in range(2)
    )
    mask = case.make_mask(device)
    dense = (
        mask.to_dense(case.B, case.Lq, case.Lk)
        if mask is not None
        else torch.ones(1, 1, case.Lq, case.Lk, dtype=torch.bool, device=device)
    )
    return q, k, v, mask, dense.expand(case.B, 1, case.Lq, case.Lk)


def _quantiles(t: list[float]) -> tuple[float, float, float]:
    t = sorted(t)
    pick = lambda f: t[round(f * (len(t) - 1))]
    return pick(0.2), pick(0.5), pick(0.8)


def measure_cpu(fns: dict, q, k, v, mask, dense, quick) -> dict[str, list[tuple[str, str, tuple]]]:
    """Per provider, as ``_measure``: the providers' calls alternate (3 or 42 rounds after one
    untimed call each, in an order shuffled every round: who runs after whom changes the caches),
    so drift of a shared CPU reaches all of them alike. With them, per peer and mode,
    ``OURS_CPU``'s time over the peer's in the same round (metric ``x_<peer>``, quantiles over the
    rounds): the paired ratio, which that drift cancels out of."""
    from benchmarks.common import PAIRED, cpu_peak_mib

    do = torch.randn(k.shape[0], q.shape[1], q.shape[2], q.shape[3])
    calls = {}
    for name, fn in fns.items():
        out = fn(q, k, v, mask, dense)
        calls[name] = {
            "forward": lambda f=fn: f(q, k, v, mask, dense),
            "backward": lambda o=out: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
            "full": lambda f=fn: torch.autograd.grad(f(q, k, v, mask, dense), (q, k, v), do),
        }
    times = {(name, mode): [] for name in calls for mode in ("forward", "backward", "full")}
    for mode in ("forward", "backward", "full"):
        for name in calls:
            calls[name][mode]()
        names, order = list(calls), random.Random(0)
        for _ in range(3 if quick else 42):
            order.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                calls[name][mode]()
                times[name, mode].append((time.perf_counter() - t0) * 1e3)
    res = {}
    for name in calls:
        res[name] = [(mode, "ms", _quantiles(times[name, mode])) for mode in ("forward", "backward", "full")]
        mem = cpu_peak_mib(calls[name]["full"])
        res[name].append(("full", "peak_MiB", (mem, mem, mem)))
    for peer in [n for n in calls if n != OURS_CPU] if OURS_CPU in calls else []:
        for mode in ("forward", "backward", "full"):
            paired = [a / b for a, b in zip(times[OURS_CPU, mode], times[peer, mode], strict=True)]
            res[OURS_CPU].append((mode, f"{PAIRED}{peer}", _quantiles(paired)))
    return res


def run(quick: bool, dtype=None, progress=print, rows=None) -> list[dict]:
    """Measure every case x provider x mode; returns CSV rows (see benchmarks.common.FIELDS)."""
    from benchmarks.common import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = environment()
    rows = [] if rows is None else rows  # benchmarks.run passes a StreamedRows
    provs = providers(device)
    for name, why in provs.items():
        if isinstance(why, str):
            progress(f"skip {name}: {why}")
    runnable = {name: fn for name, fn in provs.items() if not isinstance(fn, str)}
    all_cases = cases(quick, device)
    for ci, case in enumerate(all_cases, 1):
        q, k, v, mask, dense = inputs(case, ci, device, dtype)
        if _cpu_timing(device):
            progress(f"[{ci}/{len(all_cases)}] {case.name} {', '.join(runnable)} (alternating)")
            measured = measure_cpu(runnable, q, k, v, mask, dense, quick)
        else:
            measured = {}
            for pname, fn in runnable.items():
                progress(f"[{ci}/{len(all_cases)}] {case.name} {pname}")
                try:
                    measured[pname] = _measure(fn, q, k, v, mask, dense, quick)
                except Exception as e:  # a peer that cannot run a case is reported, never a crash
                    progress(f"    {pname} failed on {case.name}: {type(e).__name__}: {e}")
        for pname, results in measured.items():
            for mode, metric, (p20, p50, p80) in results:
                rows.append(
                    dict(
                        op=case.name,
                        provider=pname,
                        mode=mode,
                        shape=shape_text(case),
                        dtype=str(dtype).replace("torch.", ""),
                        metric=metric,
                        p20=p20,
                        p50=p50,
                        p80=p80,
                        **env,
                    )
                )
    return rows
