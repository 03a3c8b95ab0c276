#!/usr/bin/env bash
# The GPU session as ONE device call of at most 9 minutes (README, "Benchmarks"). Prepared here by
# `make gpu-prep`: vlkernels._C built for the GPU machine's Python 3.12 and torch 2.11.0+cu130
# (vlkernels/_C.cpython-312-*.so) and the peer wheels in .whl/, both carried to the device, so
# nothing is compiled from C++ there. Steps: install (the wheels; _C must load), info (versions,
# backends), tests (the GPU selection over 16 pytest workers), demo, bench (--quick paper
# workloads against the peers, then the public models patched and unpatched), table (the README's
# GPU table). Everything lands under $OUT as it goes: steps.txt (each step's status and seconds),
# info.txt, tests.log (a line per test as it ends), demo.txt, bench.txt, results.csv (a row per
# measurement as it is made), gpu_table.md.
# Each step runs under its own time limit, cut to what is left of DEADLINE seconds; a failing or
# stopped step is recorded and the next one still runs. Exit status 0 only when every step passed.
#
#   STEPS, TEST_ARGS, TEST_WORKERS, BENCH_OPS, BENCH_FLAGS, DEADLINE   (defaults below)
#   WHEELS  the directory of the peer wheels to install (default .whl; empty: none)
#   DRY=1   the rehearsal on a CPU machine: the Triton interpreter, a smoke subset of the tests,
#       the caller's Python (tests/test_gpu_session.py in CI; `make gpu-prep` with the device's
#       versions).
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
export OUT=${OUT:-/tmp/vlkernels-gpu} PY=${PYTHON:-python3} DRY=${DRY:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
export SITE=${SITE:-$OUT/site}  # the carried wheels, installed here
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-"install info tests demo bench table"}
export WHEELS=${WHEELS-.whl}
# the commit the bundle was prepared at (the device's copy of the tree has no .git)
[ -f .whl/COMMIT ] && export VLK_COMMIT=${VLK_COMMIT:-$(cat .whl/COMMIT)}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 DEADLINE=${DEADLINE:-3600}
  export TEST_ARGS=${TEST_ARGS:-"tests/test_attention.py -k custom_scale"} BENCH_FLAGS=${BENCH_FLAGS:-"--quick"}
  # one benchmark module, one that measures on a CPU (peak memory): the step's mechanics
  export TEST_WORKERS=${TEST_WORKERS:-0} BENCH_OPS=${BENCH_OPS:-contrastive}
else
  export DEADLINE=${DEADLINE:-540}
  # the GPU selection: every op x backend x dtype x mask kind at a few shapes (README, "GPU")
  export TEST_ARGS=${TEST_ARGS:-"tests/test_attention.py tests/test_contrastive.py tests/test_gated.py
    tests/test_cuda_backend.py tests/test_ops.py tests/test_cuda_graphs.py tests/test_modules.py"}
  export BENCH_FLAGS=${BENCH_FLAGS:-"--quick"} TEST_WORKERS=${TEST_WORKERS:-16}
fi
export BENCH_OPS=${BENCH_OPS:-"attention contrastive models transformers"}

install() {
  if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || return 1
  fi
  # _C as carried (built for this Python and torch by `make gpu-prep`): no compiler runs here.
  # DRY: reported, not required (a CPU machine may have no CUDA toolkit)
  "$PY" -c "import vlkernels._extension as e; x = e.get(); print('vlkernels._C:', x); assert x or $DRY" || return 1
  # and built from these csrc/ sources (`make gpu-prep` records their digest)
  if [ -f .whl/CSRC ] && [ "$(csrc_digest)" != "$(cat .whl/CSRC)" ]; then
    echo "vlkernels._C was built from other csrc/ sources than these: run make gpu-prep again"
    return 1
  fi
}
csrc_digest() { cat csrc/* | sha256sum | cut -c1-16; }
info() { "$PY" -m vlkernels.info 2>&1 | tee "$OUT/info.txt"; }
# One block config per kernel everywhere (VLK_AUTOTUNE=0: the first config the kernel's prune
# keeps): autotuning would compile every config of every kernel, about 5x the compiles, past the
# call's 9 minutes. -v: a line per test as it ends, so a run stopped by its limit keeps what it did.
export VLK_AUTOTUNE=0
# shellcheck disable=SC2086  # TEST_ARGS and BENCH_FLAGS are word lists
tests() {
  "$PY" -m pytest -v -rfE -p no:cacheprovider -n "$TEST_WORKERS" $TEST_ARGS 2>&1 \
    | tee "$OUT/tests.log" | grep -E "passed|failed|error" | tail -25
  return "${PIPESTATUS[0]}"
}
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
table() { "$PY" -m benchmarks.gpu_table "$OUT" | tee "$OUT/gpu_table.md"; }

if [ "${1:-}" = __step ]; then  # one step, run by the loop below under its time limit
  "$2"
  exit $?
fi

declare -A LIMIT=([install]=40 [info]=30 [tests]=${TEST_TIMEOUT:-230} [demo]=90 [bench]=${BENCH_TIMEOUT:-130}
                  [table]=10)
: > "$OUT/steps.txt"
failed=0
t0=$(date +%s)
for s in $STEPS; do
  start=$(date +%s)
  left=$((DEADLINE - (start - t0)))
  echo "== $s" >&2
  if [ -z "${LIMIT[$s]:-}" ]; then
    echo "unknown step $s" >&2
    rc=2
  elif [ "$left" -le 0 ]; then
    echo "no time left for $s" >&2
    rc=124
  else
    limit=${LIMIT[$s]}
    [ "$DRY" = 1 ] && limit=$((limit * 4))  # the interpreter on a CPU is slower than the GPU
    [ "$limit" -gt "$left" ] && limit=$left
    timeout "$limit" bash "$SELF" __step "$s"
    rc=$?
  fi
  echo "$s rc=$rc seconds=$(($(date +%s) - start))" | tee -a "$OUT/steps.txt" >&2
  [ "$rc" = 0 ] || failed=1
done
cat "$OUT/steps.txt"
exit $failed
