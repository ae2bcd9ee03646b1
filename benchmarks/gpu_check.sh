#!/usr/bin/env bash
# The GPU check, in one command for a fresh GPU machine, its limits adding up to under 10 minutes
# (build 100 s + tests 280 s + benchmark 200 s, Triton compilation included). Measured on an H200
# on 2026-12-04 (9725821): the CUDA build finished inside 90 s; the test tier did not finish in
# 240 s (the tests were cut since); the benchmark measured 15 of its 31 providers in 200 s:
#
#   1. install peftkern without network: with the C++ extension built for CUDA where nvcc and
#      ninja are present (the cpp backend's C++ autograd node is then checked and timed on
#      CUDA; at most GPU_BUILD_LIMIT s), else without the extension;
#   2. run the GPU tests in parallel, printing each failure with its error the moment it
#      happens (PEFTKERN_INSTAFAIL, tests/conftest.py), so a run cut off still names them;
#   3. run the project's GPU step benchmark (benchmarks/bench_gpu_step.py);
#   4. write everything, with the device, date and commit, under $OUT (default
#      benchmarks/results/gpu/<date>-<commit>/): versions.txt, gpu_tests.log, gpu_step.jsonl,
#      gpu_step.md, profile_<provider>.txt (one profiled step of our DoRA and PEFT's on all linear
#      layers, and of our LoRA: which kernels take the time), summary.md: 8 files, the most a
#      lent machine returns.
#
# The lent H200's image has torch, triton, transformers and peft but not bitsandbytes (the QLoRA
# tests skip and its step rows error without it). The 2026-12-04 run carried the wheel
# (bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl, 43 MB, under the ignored .whl/) and began:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# and named the commit (the machine gets no .git): PEFTKERN_COMMIT=<sha> bash benchmarks/gpu_check.sh
#
#   benchmarks/gpu_check.sh              on a GPU machine (the commit from PEFTKERN_COMMIT or git)
#   benchmarks/gpu_check.sh --dry-run    anywhere: checks the script itself (tests collected, the
#                                        benchmark's --quick mode on the CPU); measures nothing
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
COMMIT=${PEFTKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PEFTKERN_COMMIT=$COMMIT PYTHONUNBUFFERED=1
# a dry run writes to a scratch folder: its CPU --quick figures must never land among the GPU results
if [ $DRY = 1 ]; then OUTDIR=${OUT:-$(mktemp -d)}; else OUTDIR=${OUT:-benchmarks/results/gpu/$(date -u +%Y-%m-%d)-$COMMIT}; fi
mkdir -p "$OUTDIR"
TESTS="tests/gpu"
TEST_LIMIT=${GPU_TEST_LIMIT:-280}
BENCH_LIMIT=${GPU_BENCH_LIMIT:-200}
BUILD_LIMIT=${GPU_BUILD_LIMIT:-100}
build_rc="dry run"
started=$(date +%s)

{
  echo "commit: $COMMIT"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY -c 'import triton, transformers, peft; print("triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1
} | tee "$OUTDIR/versions.txt"

if [ $DRY = 0 ]; then
  # The C++ extension with CUDA gives the cpp backend (its adapter one C++ autograd node) on CUDA:
  # the GPU tests and the *_cpp step providers run it. Built only where nvcc and ninja make that
  # quick (parallel, capped); otherwise peftkern is installed without it and those skip/error.
  if command -v nvcc >/dev/null 2>&1 && $PY -c 'import sys; from torch.utils.cpp_extension import is_ninja_available as n; sys.exit(0 if n() else 1)' 2>/dev/null; then
    echo "== install with the C++ extension for CUDA (no network; limit ${BUILD_LIMIT}s)"
    MAX_JOBS=$(nproc) timeout "$BUILD_LIMIT" $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
    build_rc=${PIPESTATUS[0]}
  else
    echo "== no nvcc or no ninja: the C++ extension is not built (cpp on CUDA is not checked)"
    build_rc=skipped
  fi
  if [ "$build_rc" != 0 ]; then
    echo "== install without the C++ extension (no network)"
    PEFTKERN_NO_EXT=1 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
  fi
  echo "== GPU tests (each failure printed when it happens; limit ${TEST_LIMIT}s)"
  WORKERS="-n 8"
  $PY -c 'import xdist' 2>/dev/null || WORKERS=""
  # -v to the log: a run cut off at its limit still says which tests passed; the console gets the failures
  PEFTKERN_INSTAFAIL=1 timeout "$TEST_LIMIT" $PY -m pytest $WORKERS -p no:cacheprovider -v -rfE --durations=15 $TESTS \
    > "$OUTDIR/gpu_tests.log" 2>&1
  tests_rc=$?
  grep -E "^FAIL|^E  |passed|failed" "$OUTDIR/gpu_tests.log" | grep -v " PASSED" | tail -60
  echo "== GPU step benchmark (limit ${BENCH_LIMIT}s)"
  # then one profiled step each of our DoRA and PEFT's (ours was 1.10-1.17x PEFT's on 2026-12-04: where
  # does it go?) and of our LoRA (after the table, so a cut-off loses no row)
  timeout "$BENCH_LIMIT" $PY benchmarks/bench_gpu_step.py --out "$OUTDIR" --profile pk_dora_all,peft_dora_all,pk_lora_qv 2>&1 | tail -40
  bench_rc=${PIPESTATUS[0]}
else
  echo "== dry run: the GPU tests are collected (they skip without CUDA), the benchmark runs --quick on the CPU"
  $PY -m pytest --collect-only -q -p no:cacheprovider $TESTS 2>&1 | tail -3 | tee "$OUTDIR/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
  # one provider of every kind the GPU run builds (AdaLoRA's schedule, DoRA, the 4-bit base), so a
  # provider that cannot be built fails here, not on the GPU (the second GPU run lost AdaLoRA's rows so)
  $PY benchmarks/bench_gpu_step.py --quick --out "$OUTDIR" --profile pk_lora_qv \
    --providers floor,pk_lora_qv,peft_lora_qv,pk_adalora_qv,peft_adalora_qv,pk_hyper_adalora_qv,pk_dora_qv,peft_dora_qv,pk_qlora_qv,peft_qlora_qv \
    2>&1 | tail -14
  bench_rc=${PIPESTATUS[0]}
fi

passed=$(grep -Eo '[0-9]+ passed' "$OUTDIR/gpu_tests.log" | tail -1)
failed=$(grep -Eo '[0-9]+ failed' "$OUTDIR/gpu_tests.log" | tail -1)
# a run cut off at its limit prints no totals: count the verbose log's results instead
[ -z "$passed" ] && passed="$(grep -c ' PASSED' "$OUTDIR/gpu_tests.log") passed before the limit"
[ -z "$failed" ] && failed="$(grep -c ' FAILED' "$OUTDIR/gpu_tests.log") failed"
{
  echo "# GPU check"
  echo
  echo "$(head -3 "$OUTDIR/versions.txt" | tr '\n' ';')"
  echo
  echo "- mode: $([ $DRY = 1 ] && echo 'dry run (no measurement)' || echo 'GPU')"
  echo "- C++ extension for CUDA: build exit $build_rc (0: the cpp backend was checked on CUDA)"
  echo "- GPU tests: exit $tests_rc; ${passed:-0 passed}, ${failed:-0 failed} (gpu_tests.log)"
  echo "- step benchmark: exit $bench_rc (gpu_step.md)"
  echo "- wall time: $(( $(date +%s) - started )) s"
} > "$OUTDIR/summary.md"
cat "$OUTDIR/summary.md"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
