"""benchmarks/gpu_session.sh, the one script a GPU session runs, rehearsed on this CPU (DRY=1: the
interpreter, a smoke subset of the tests, --quick benchmarks) so that it cannot rot between the
sessions that are lent a GPU. CPU only: on the GPU the script itself runs."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of the GPU session")
def test_gpu_session_script_dry_run(tmp_path):
    # WHEELS empty: the peer wheels in .whl/ (make gpu-prep) are the device's Python's, not this one's
    env = dict(os.environ, DRY="1", OUT=str(tmp_path), PYTHON=sys.executable, WHEELS="")
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    steps = (tmp_path / "steps.txt").read_text()
    assert out.returncode == 0, steps + out.stdout[-3000:] + out.stderr[-3000:]
    names = [line.split()[0] for line in steps.splitlines()]
    assert names == ["install", "info", "tests", "demo", "bench", "table"]
    assert "rc=0" in steps and "rc=1" not in steps
    assert "passed" in (tmp_path / "tests.log").read_text()
    assert "Q-Former" in (tmp_path / "demo.txt").read_text()
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("op,provider,mode") and len(rows) > 1
    assert (tmp_path / "gpu_table.md").read_text().startswith("Device ")
