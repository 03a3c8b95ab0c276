#!/usr/bin/env bash
# One device call (README, "Benchmarks"): install vlkernels with the machine's own torch, run
# the test suite on CUDA, the demo and the attention benchmarks; everything lands under $OUT.
# Peers missing there (open_clip, open_flamingo, hypothesis, xformers) travel as wheels in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/vlkernels-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
python3 -m vlkernels.info 2>&1 | tee "$OUT/info.txt"
# tests: one block config per kernel (VLK_AUTOTUNE=0), or every new shape would be autotuned
VLK_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-360}" python3 -m pytest -q -p no:cacheprovider tests 2>&1 \
  | tee "$OUT/tests.log" | tail -25
python3 -m vlkernels.demo 2>&1 | tee "$OUT/demo.txt"
python3 -m benchmarks.run --op attention ${BENCH_FLAGS:---quick} --out "$OUT/results.csv" 2>&1 | tee "$OUT/bench.txt" | tail -60
