#!/usr/bin/env bash
# Compile every CUDA kernel source of softtf (csrc/cuda/*.cu) with plain nvcc -- no torch headers --
# for sm_80 and sm_90, with `-Xptxas -v`, and fail on any compile error, any warning, or any
# register spill ("N bytes spill stores/loads" with N > 0). Prints registers per kernel.
#
# nvcc comes from $NVCC, else $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else `nvcc` on PATH.
# Usage: tools/check_cuda.sh [-j JOBS] [ARCH ...]     (default archs: 80 90)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs=2
if [[ "${1:-}" == "-j" ]]; then jobs="$2"; shift 2; fi
archs=("$@")
[[ ${#archs[@]} -eq 0 ]] && archs=(80 90)

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [[ -n "$root" && -x "$root/bin/nvcc" ]]; then nvcc="$root/bin/nvcc"; break; fi
  done
fi
[[ -z "$nvcc" ]] && nvcc="$(command -v nvcc || true)"
if [[ -z "$nvcc" ]]; then
  echo "check_cuda: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)" >&2
  exit 2
fi

shopt -s nullglob
sources=("$here"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: no CUDA sources under csrc/cuda" >&2
  exit 2
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# The same dialect and half/bf16 macros as torch's CUDAExtension build (setup.py), so code that
# relies on implicit half conversions fails here too.
flags=(-std=c++20 -O3 --expt-relaxed-constexpr -lineinfo
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Werror all-warnings -Xptxas -v -I "$here/csrc")
# Extra nvcc flags (NVCC_EXTRA_FLAGS), e.g. for experiments. Note __launch_bounds__ on the kernels
# takes precedence over -maxrregcount.
read -r -a extra <<<"${NVCC_EXTRA_FLAGS:-}"
flags+=("${extra[@]}")

compile() {  # compile SRC ARCH -> log file
  local src="$1" arch="$2" name
  name="$(basename "$src" .cu)_sm$arch"
  if "$nvcc" "${flags[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" \
       -o "$out/$name.o" >"$out/$name.log" 2>&1; then
    echo ok >"$out/$name.rc"
  else
    echo fail >"$out/$name.rc"
  fi
}

demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }

start=$SECONDS
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    compile "$src" "$arch" &
    while (( $(jobs -rp | wc -l) >= jobs )); do wait -n || true; done
  done
done
wait

status=0
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    name="$(basename "$src" .cu)_sm$arch"
    log="$out/$name.log"
    if [[ "$(cat "$out/$name.rc")" != ok ]]; then
      echo "FAIL  $name: compile error"; cat "$log"; status=1; continue
    fi
    spills="$(grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$log" || true)"
    if [[ -n "$spills" ]]; then
      echo "FAIL  $name: register spills"; grep -B1 -A1 -E '[1-9][0-9]* bytes spill' "$log"; status=1
    fi
    # One line per kernel: demangled-ish name and registers.
    awk -v tag="$name" '
      /Function properties for/ { fn = $NF }
      /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15);
                                 printf "  %-16s %4s regs  %s\n", tag, r, fn }' "$log" | demangle
  done
done
echo "check_cuda: ${#sources[@]} sources x ${#archs[@]} archs in $((SECONDS - start)) s with $nvcc"
if [[ $status -ne 0 ]]; then echo "check_cuda: FAILED"; else echo "check_cuda: OK (no errors, no warnings, no spills)"; fi
exit $status
