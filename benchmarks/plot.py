"""``python -m benchmarks.plot [--csv FILE] [--out DIR]``: one PNG per op from the results CSV —
median (p20–p80 bars) per provider and shape, for the latest device/commit of each op."""

from __future__ import annotations

import argparse
import csv
import pathlib
import re
from collections import defaultdict

from benchmarks.common import RESULTS


def _natural(text: str):
    """Sort key: numbers inside the text compare as numbers (N=2000 before N=16000)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def plot(csv_path: pathlib.Path, out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:  # keep each op's most recent run
        key = r["op"]
        stamp = (r["date"], r["commit"], r["device"])
        latest[key] = max(latest.get(key, stamp), stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op, stamp in sorted(latest.items()):
        sel = [r for r in rows if r["op"] == op and (r["date"], r["commit"], r["device"]) == stamp]
        metrics = sorted({(r["mode"], r["metric"]) for r in sel})
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
        for ax, (mode, metric) in zip(axes[0], metrics, strict=True):
            series = defaultdict(list)
            for r in sel:
                if (r["mode"], r["metric"]) == (mode, metric):
                    series[r["provider"]].append(
                        (r["shape"], float(r["p20"]), float(r["p50"]), float(r["p80"]))
                    )
            shapes = sorted({s for pts in series.values() for s, *_ in pts}, key=_natural)
            width = 0.8 / max(1, len(series))
            for i, (prov, pts) in enumerate(sorted(series.items())):
                by_shape = {s: (lo, mid, hi) for s, lo, mid, hi in pts}
                xs = [j + i * width for j, s in enumerate(shapes) if s in by_shape]
                mids = [by_shape[s][1] for s in shapes if s in by_shape]
                errs = [
                    [by_shape[s][1] - by_shape[s][0] for s in shapes if s in by_shape],
                    [by_shape[s][2] - by_shape[s][1] for s in shapes if s in by_shape],
                ]
                ax.bar(xs, mids, width, yerr=errs, label=prov)
            ax.set_xticks(
                [j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right", fontsize=7
            )
            ax.set_title(f"{op}: {mode} {metric}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"{stamp[2]} · {stamp[1]} · {stamp[0]}", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", type=pathlib.Path, default=RESULTS)
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS.parent / "plots")
    args = ap.parse_args(argv)
    for p in plot(args.csv, args.out):
        print(p)


if __name__ == "__main__":
    main()
