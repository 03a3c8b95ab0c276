"""How long the GPU session's test step will compile, estimated on this CPU.

``python -m benchmarks.gpu_estimate DIR [--sample K] [--workers W]``: DIR holds the compiles a run
of the GPU test selection makes (``VLK_RECORD_COMPILES=DIR pytest ...`` under the interpreter:
``static.record_compiles``, one record per distinct kernel, signature, constants and
specialisation). A random sample of K of them is compiled for sm_90a with the Triton first on the
path (the device's 3.6.0: ``PYTHONPATH=$VLK_GPU_TRITON_PATH``), without a cache, on every core
here; the estimate is count x mean compile time / W, the device's pytest workers (its 16 cores).
Each distinct compile happens once per worker that meets it first (Triton's cache is shared), so
this is the floor when the workers share out the compiles and count x mean / 1 the ceiling.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import random
import statistics
import tempfile
import time


def load(directory: str) -> list[tuple]:
    """The distinct compiles recorded under ``directory`` (every process's file merged)."""
    from benchmarks import static  # (imports vlkernels: after main() has set the environment)

    jobs = {}
    for path in sorted(glob.glob(os.path.join(directory, "compiles-*.pkl"))):
        with open(path, "rb") as f:
            for job in pickle.load(f):
                jobs.setdefault(static.compile_key(job), job)
    return list(jobs.values())


def _compile(job) -> tuple[str, float]:
    import importlib

    from triton.runtime.autotuner import Autotuner

    from benchmarks import static

    module, name, sig, constexprs, attrs, _ = job
    fn = importlib.import_module(module).__dict__[name]
    if isinstance(fn, Autotuner):
        fn = fn.fn
    t0 = time.perf_counter()
    static.compile_signature(fn, sig, constexprs, attrs, {}, 90)
    return name, time.perf_counter() - t0


def estimate(jobs: list[tuple], sample: int, workers: int) -> dict:
    """Compile a random sample of ``jobs`` for sm_90a (no cache) and extrapolate."""
    from concurrent.futures import ProcessPoolExecutor

    import triton

    chosen = random.Random(0).sample(jobs, min(sample, len(jobs)))
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlk-triton-cache-")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        timed = list(pool.map(_compile, chosen))
    seconds = [s for _, s in timed]
    mean = statistics.fmean(seconds)
    return dict(
        triton=triton.__version__,
        compiles=len(jobs),
        sampled=len(chosen),
        mean_s=mean,
        median_s=statistics.median(seconds),
        max_s=max(seconds),
        slowest=sorted(timed, key=lambda t: -t[1])[:5],
        serial_s=mean * len(jobs),
        workers=workers,
        wall_s=mean * len(jobs) / workers,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--sample", type=int, default=40)
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    r = estimate(load(args.directory), args.sample, args.workers)
    print(
        f"{r['compiles']} distinct compiles; {r['sampled']} sampled with Triton {r['triton']} for sm_90a: "
        f"mean {r['mean_s']:.1f} s, median {r['median_s']:.1f} s, max {r['max_s']:.1f} s "
        f"({', '.join(f'{n} {s:.0f} s' for n, s in r['slowest'])})\n"
        f"estimated compile time: {r['serial_s']:.0f} s on one core, "
        f"{r['wall_s']:.0f} s over {r['workers']} workers"
    )


if __name__ == "__main__":
    main()
