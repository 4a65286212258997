#!/usr/bin/env bash
# Every GPU check of softtf in one command, on a machine with an NVIDIA GPU and a CUDA build of torch
# (nothing is fetched: torch, triton, timm, transformers, pytest must already be installed).
#
#   tools/gpu_check.sh              # results into gpu-results/
#   OUT=/some/dir tools/gpu_check.sh
#   tools/gpu_check.sh --dry-run    # no GPU needed: prints and logs what each stage would run
#
# Stages, each under its own time limit (570 s in all; measured on an H100: build 40 s, tests 176 s,
# gpu_bench 44 s, bench 130-148 s at 10 repeats) so the whole script ends within 10 minutes:
#   1. env       nvidia-smi, python, torch, triton versions                       -> env.txt
#   2. build     softtf_kernels._C with the CUDA kernels, for this GPU's arch only,
#                all cores (pip install --no-build-isolation --no-deps -e .)     -> build.log
#   3. tests     every GPU test file (tests/test_*_gpu.py), xdist if there, junit -> tests.log, tests.xml
#   4. gpu_bench bench/gpu_bench.py (masked_linear roofline + timings)            -> gpu_bench.log
#   5. bench     softtf bench --device cuda (JSON + plot)                          -> bench.log, bench.json, bench.png
# At most 8 files land in $OUT. The exit status is the first failing stage's (0 when all pass); later
# stages still run so one failure does not hide the others.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
jobs="$(nproc 2>/dev/null || echo 4)"
export PYTHONUNBUFFERED=1
status=0

# run_stage NAME SECONDS LOG CMD...: runs CMD under `timeout`, output into $OUT/LOG and the terminal.
run_stage() {
  local name="$1" limit="$2" log="$3"; shift 3
  echo "== gpu_check: $name (limit ${limit}s): $*" | tee "$OUT/$log"
  if [[ $dry -eq 1 ]]; then
    echo "   dry run: skipped" | tee -a "$OUT/$log"
    return 0
  fi
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  rc=${PIPESTATUS[0]}
  echo "== gpu_check: $name exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$log"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
  return $rc
}

# 1. env
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [[ $dry -eq 0 ]]; then nvidia-smi || echo "nvidia-smi failed"; fi
  "$PY" - <<'EOF' || echo "python could not import torch"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("gpu: none visible to torch")
EOF
} 2>&1 | tee "$OUT/env.txt"

if [[ $dry -eq 0 ]]; then
  arch="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(0); print(f"{m}.{n}")')" || {
    echo "gpu_check: torch sees no CUDA device; nothing to check (use --dry-run without a GPU)" >&2
    exit 3
  }
else
  arch="9.0"
fi

# 2. build: this GPU's architecture only, every core.
if ! run_stage build 120 build.log env SOFTTF_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  echo "gpu_check: the build failed; the later stages would test a stale or missing extension" >&2
  exit "$status"
fi

# 3. every GPU test file.
shopt -s nullglob
gpu_tests=(tests/test_*_gpu.py)
# Triton's autotuning compiles dominate these tests (CPU-bound): spread them over the cores when
# pytest-xdist is there (362 tests: 176 s with -n 16 on an H100 machine, over 4 minutes in one process).
parallel=()
if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "$(( jobs < 16 ? jobs : 16 ))" -p no:benchmark); fi
run_stage tests 240 tests.log "$PY" -m pytest -q -p no:cacheprovider -rs --durations=10 "${parallel[@]}" \
  --junitxml="$OUT/tests.xml" "${gpu_tests[@]}"

# 4. the masked_linear roofline and timings.
run_stage gpu_bench 60 gpu_bench.log "$PY" bench/gpu_bench.py

# 5. the main job on the GPU, at sizes where a GPU has work to do.
run_stage bench 150 bench.log "$PY" -c 'import sys; from softtf.cli import main; sys.exit(main())' \
  bench --device cuda --output "$OUT" --no-progress \
  --layer-batch 64 --vit-batch 32 --bert-batch 32 --warmup 3 --repeats 7 --model-repeats 3

# bench also writes bench.txt and bench.md: bench.log already holds their tables (and $OUT keeps <= 8 files).
rm -f "$OUT/bench.txt" "$OUT/bench.md"
echo "== gpu_check: done, exit $status; results in $OUT:"
ls -1 "$OUT"
exit "$status"
