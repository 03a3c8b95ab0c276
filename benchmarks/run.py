"""``python -m benchmarks.run --op {attention,contrastive,models,transformers,budget} [--quick]
[--out FILE]``: run one benchmark module, append what it measured to the CSV and print the medians
with their ratio to vlkernels in the same run."""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys

import torch

OPS = ("attention", "contrastive", "models", "transformers", "budget", "host")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--op", choices=OPS, default="attention")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="CSV to append to")
    args = ap.parse_args(argv)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.op in ("budget", "transformers", "host") and (interp or os.environ.get("VLK_POISON", "0") != "0"):
        print(
            f"{args.op}: re-running without TRITON_INTERPRET and VLK_POISON (compiled kernels or the "
            "torch backend, no NaN fills)",
            flush=True,
        )
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLK_POISON")}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *sys.argv[1:]], env)
    if args.op == "models" and not torch.cuda.is_available() and not interp:
        print("No GPU: re-running under the Triton interpreter (--quick shapes, no timings)", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *sys.argv[1:], "--quick"], env)

    from benchmarks.common import PAIRED, RESULTS, StreamedRows, measured

    module = importlib.import_module(f"benchmarks.bench_{args.op}")
    out = args.out or getattr(module, "RESULTS", RESULTS)
    rows = StreamedRows(out)  # each measured row reaches the CSV as soon as it is measured
    module.run(args.quick, progress=lambda s: print(s, flush=True), rows=rows)
    timed = measured(rows)
    if len(timed) < len(rows):
        print(
            f"\nWithout a GPU: {len({(r['op'], r['provider']) for r in rows})} (case, provider) pairs "
            "ran; timings need a GPU."
        )
    if not timed:
        return
    print(f"\n{rows.written} rows appended to {out}\n")
    if hasattr(module, "summary"):
        module.summary(timed)
        return
    ours = {
        (r["op"], r["shape"], r["mode"], r["metric"]): r["p50"]
        for r in timed
        if r["provider"].startswith("vlkernels") and not r["metric"].startswith(PAIRED)
    }
    print(f"{'op':<22} {'shape':<26} {'provider':<17} {'mode':<8} {'metric':<9} {'p50':>10} {'/ ours':>7}")
    for r in timed:
        base = ours.get((r["op"], r["shape"], r["mode"], r["metric"]))
        ratio = f"{r['p50'] / base:.2f}x" if base else "-"
        print(
            f"{r['op']:<22} {r['shape'][:26]:<26} {r['provider']:<17} {r['mode']:<8} {r['metric']:<9} "
            f"{r['p50']:>10.4g} {ratio:>7}"
        )


if __name__ == "__main__":
    main()
