"""Host cost of an eager call as a ratio to SDPA's, measured in one process (benchmarks/bench_host:
shuffled rounds, medians, paired per-round ratios): never absolute microseconds, which a busy CI
machine moves. Each case within bench_host.CEILINGS; the targets are the benchmark's to report."""

import json
import os
import subprocess
import sys

from benchmarks import bench_host


def test_host_time_within_its_ratio_to_sdpa():
    """In a process without the interpreter: Triton's launch path (kernels compiled for sm_90, a
    driver that launches nothing), the torch backend, the CUDA C++ entry point (its CPU emulation,
    launches returning at once) and SDPA on the same tiny tensors."""
    code = (
        "import json; from benchmarks import bench_host as b; "
        "print(json.dumps({' '.join(k): v for k, v in b.measure(rounds=8, calls=10).items()}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLK_POISON")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-5000:]
    measured = {tuple(k.split(" ")): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert len(measured) == 12
    over = bench_host.over(measured, bench_host.CEILINGS)
    assert not over, "host cost over its ceiling:\n" + "\n".join(over)
