#!/usr/bin/env bash
# Download, on this machine, the wheels that the GPU machine lacks (it has torch, triton, pytest,
# numpy, transformers but not these) into .whl/ for the device tool's `carry`; Python 3.12 x86-64.
# Then run there: bash benchmarks/gpu_session.sh  (it installs .whl/*.whl first).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
# xformers is left out by default: its wheel alone may exceed the device tool's 64 MiB carry limit
# (EXTRA="xformers==0.0.35" to try).
for pkg in open-clip-torch==3.3.0 open-flamingo==2.0.1 einops einops-exts hypothesis sortedcontainers \
           attrs ftfy wcwidth regex inf-cl ${EXTRA:-}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .whl "$pkg" || echo "could not fetch $pkg (the benchmark skips that peer)"
done
du -sh .whl
