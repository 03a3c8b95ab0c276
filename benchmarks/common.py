"""Timing, memory and CSV helpers shared by the benchmark modules."""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import subprocess
import tempfile
import time

import torch

RESULTS = pathlib.Path(__file__).parent / "results" / "results.csv"
PAIRED = "x_"  # metric prefix of a paired per-round ratio (metric x_<peer>: vlkernels / <peer>)
FIELDS = [
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "metric",
    "p20",
    "p50",
    "p80",
    "device",
    "torch",
    "triton",
    "commit",
    "date",
]


def environment() -> dict:
    import triton

    commit = os.environ.get("VLK_COMMIT")  # set by gpu_session.sh: the device's copy has no .git
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(
        device=device,
        torch=torch.__version__,
        triton=triton.__version__,
        commit=commit,
        date=datetime.date.today().isoformat(),
    )


def time_ms(fn, quick: bool) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of ``fn``: triton's do_bench on a GPU; on CPU, of 3 (quick) or
    11 timed calls after one untimed; under the Triton interpreter one untimed call (NaN)."""
    if torch.cuda.is_available():
        import triton

        return tuple(
            triton.testing.do_bench(
                fn, warmup=5 if quick else 25, rep=20 if quick else 100, quantiles=[0.2, 0.5, 0.8]
            )
        )
    fn()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return (float("nan"),) * 3
    times = []
    for _ in range(3 if quick else 11):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda f: times[round(f * (len(times) - 1))]
    return pick(0.2), pick(0.5), pick(0.8)


def peak_mib(fn) -> float:
    """Peak memory above the current allocation while ``fn`` runs (GPU only)."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_mib(fn) -> float:
    """Peak bytes held by PyTorch's CPU allocator above what was held before, while ``fn`` runs
    (MiB; from the profiler's memory events, whose "Total Allocated" is the allocator's running
    total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    events.sort(key=lambda e: e["ts"])
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in events) - before) / 2**20


def append_rows(rows: list[dict], path: pathlib.Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def measured(rows) -> list[dict]:
    """The rows that hold a measurement (p50 not NaN: without a GPU some rows are not timed)."""
    return [r for r in rows if r["p50"] == r["p50"]]


class StreamedRows(list):
    """A benchmark's rows, each measured one (p50 not NaN) appended to the CSV at ``path`` as it is
    added: a run stopped part-way (a time limit) keeps what it measured."""

    def __init__(self, path: pathlib.Path):
        super().__init__()
        self.path, self.written = path, 0

    def append(self, row: dict) -> None:
        self.extend([row])

    def extend(self, rows) -> None:
        rows = list(rows)
        super().extend(rows)
        kept = measured(rows)
        if kept:
            append_rows(kept, self.path)
            self.written += len(kept)

    def __iadd__(self, rows):
        self.extend(rows)
        return self
