#!/usr/bin/env bash
# The GPU session in one script (README, "Benchmarks"): install vlkernels with the machine's own
# torch, then versions and backends, the test suite on CUDA, the demo and the benchmarks.
# Everything lands under $OUT: steps.txt (each step's status and seconds), info.txt, tests.log,
# demo.txt, bench.txt, results.csv. A failing step is recorded and the next one still runs; the
# exit status is 0 only when every step passed. Plot here afterwards: python -m benchmarks.plot.
#
#   STEPS="install info tests demo bench"   the steps, in order (this is the default). The device
#       tool's 10 minutes per command fit about install+info+tests+demo in one call and
#       install+bench in the next.
#   TEST_ARGS, BENCH_OPS, BENCH_FLAGS      what tests and benchmarks run (defaults below)
#   DRY=1                                   CI's rehearsal on a CPU machine (tests/test_gpu_session.py):
#       the caller's Python and installed package, the Triton interpreter, a smoke subset of the
#       tests and --quick benchmarks, so that the script cannot rot between GPU sessions.
# Peers missing on the GPU machine (open_clip, open_flamingo, hypothesis, inf-cl) travel as
# wheels in .whl/ (benchmarks/fetch_wheels.sh) and are installed by the install step.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
export OUT=${OUT:-/tmp/vlkernels-gpu} PY=${PYTHON:-python3} DRY=${DRY:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  STEPS=${STEPS:-"info tests demo bench"}
  export TEST_ARGS=${TEST_ARGS:-"tests/test_attention.py -k custom_scale"} BENCH_FLAGS=${BENCH_FLAGS:-"--quick"}
else
  STEPS=${STEPS:-"install info tests demo bench"}
  export TEST_ARGS=${TEST_ARGS:-"tests"} BENCH_FLAGS=${BENCH_FLAGS:-""}
fi
export BENCH_OPS=${BENCH_OPS:-"attention contrastive models"}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

install() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
  fi
  MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
}
info() { "$PY" -m vlkernels.info 2>&1 | tee "$OUT/info.txt"; }
# tests: one block config per kernel (VLK_AUTOTUNE=0), or every new test shape would be autotuned
# shellcheck disable=SC2086  # TEST_ARGS and BENCH_FLAGS are word lists
tests() { VLK_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider $TEST_ARGS 2>&1 | tee "$OUT/tests.log" | tail -25; }
demo() { "$PY" -m vlkernels.demo 2>&1 | tee "$OUT/demo.txt" | tail -15; }
bench() {
  local op rc=0
  for op in $BENCH_OPS; do
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.run --op "$op" $BENCH_FLAGS --out "$OUT/results.csv" 2>&1 | tee -a "$OUT/bench.txt" \
      | tail -40 || rc=1
  done
  return $rc
}

if [ "${1:-}" = __step ]; then  # one step, run by step() below under its time limit
  "$2"
  exit $?
fi

declare -A LIMIT=([install]=300 [info]=60 [tests]=${TEST_TIMEOUT:-330} [demo]=180 [bench]=${BENCH_TIMEOUT:-540})
: > "$OUT/steps.txt"
failed=0
for s in $STEPS; do
  start=$(date +%s)
  echo "== $s" >&2
  if [ -n "${LIMIT[$s]:-}" ]; then
    timeout "${LIMIT[$s]}" bash "$SELF" __step "$s"
    rc=$?
  else
    echo "unknown step $s" >&2
    rc=2
  fi
  echo "$s rc=$rc seconds=$(($(date +%s) - start))" | tee -a "$OUT/steps.txt" >&2
  [ "$rc" = 0 ] || failed=1
done
cat "$OUT/steps.txt"
exit $failed
