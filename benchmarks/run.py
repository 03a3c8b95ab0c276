"""``python -m benchmarks.run --op attention [--quick] [--out FILE]``: run a benchmark module,
print a table of medians (with the ratio to vlkernels in the same run) and append to the CSV."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

OPS = ("attention",)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--op", choices=OPS, default="attention")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="CSV to append to")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("No GPU: re-running under the Triton interpreter (--quick shapes, no timings)", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *sys.argv[1:], "--quick"], env)

    from benchmarks import bench_attention
    from benchmarks.common import RESULTS, append_rows

    rows = bench_attention.run(args.quick, progress=lambda s: print(s, flush=True))
    if not torch.cuda.is_available():
        ran = sorted({(r["op"], r["provider"]) for r in rows})
        print(f"\nSmoke run without a GPU: {len(ran)} (case, provider) pairs ran; no timings recorded.")
        return
    append_rows(rows, args.out or RESULTS)
    print(f"\n{len(rows)} rows appended to {args.out or RESULTS}\n")
    ours = {(r["op"], r["mode"], r["metric"]): r["p50"] for r in rows if r["provider"] == "vlkernels-triton"}
    print(f"{'op':<28} {'provider':<18} {'mode':<9} {'metric':<9} {'p50':>10} {'vs vlkernels':>13}")
    for r in rows:
        base = ours.get((r["op"], r["mode"], r["metric"]))
        ratio = f"{r['p50'] / base:.2f}x" if base and base == base and r["p50"] == r["p50"] else "-"
        print(
            f"{r['op']:<28} {r['provider']:<18} {r['mode']:<9} {r['metric']:<9} {r['p50']:>10.4g} {ratio:>13}"
        )


if __name__ == "__main__":
    main()
