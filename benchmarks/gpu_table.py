"""The README's GPU table, from what a GPU session left under its $OUT.

``python -m benchmarks.gpu_table OUT`` prints the markdown (device, versions, commit, date, the
steps' status, then per workload and mode vlkernels' median time and each peer's, with the ratio
peer / vlkernels); ``--readme README.md`` also puts it between the README's ``gpu-table`` markers.
benchmarks/gpu_session.sh runs it as its last step (``gpu_table.md``).
"""

from __future__ import annotations

import argparse
import csv
import pathlib

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def _rows(out: pathlib.Path) -> list[dict]:
    path = out / "results.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r["p50"] not in ("", "nan")]


def markdown(out: pathlib.Path) -> str:
    """The table for the session whose files are under ``out``."""
    rows = _rows(out)
    steps = (out / "steps.txt").read_text().split("\n") if (out / "steps.txt").exists() else []
    head = {k: (rows[0] if rows else {}).get(k, "?") for k in ("device", "torch", "triton", "commit", "date")}
    lines = [
        f"Device {head['device']}, torch {head['torch']}, Triton {head['triton']}, commit {head['commit']}, "
        f"{head['date']}; steps: " + ", ".join(s.replace(" seconds=", " ") + " s" for s in steps if s),
        "",
    ]
    timed = [r for r in rows if r["metric"] == "ms"]
    if not timed:
        return "\n".join([*lines, "No timed rows."])
    peers = sorted({r["provider"] for r in timed if not r["provider"].startswith("vlkernels")})
    lines += [
        "| workload | shape | mode | vlkernels ms |" + "".join(f" {p} ms (x) |" for p in peers),
        "|---|---|---|---|" + "---|" * len(peers),
    ]
    cases = {}
    for r in timed:
        cases.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = float(r["p50"])
    for (op, shape, mode), by in cases.items():
        ours = next((v for p, v in by.items() if p.startswith("vlkernels")), None)
        cells = []
        for p in peers:
            v = by.get(p)
            cells.append("-" if v is None else f"{v:.3g}" + (f" ({v / ours:.2f}x)" if ours else ""))
        mine = "-" if ours is None else f"{ours:.3g}"
        lines.append(f"| {op} | {shape} | {mode} | {mine} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def into_readme(table: str, readme: pathlib.Path) -> None:
    """Replace what stands between the README's gpu-table markers with ``table``."""
    text = readme.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{table}\n{END}{after}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--readme", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    table = markdown(args.out)
    print(table)
    if args.readme:
        into_readme(table, args.readme)


if __name__ == "__main__":
    main()
