#!/usr/bin/env bash
# Compile-check every torch-free CUDA header (csrc/cuda/kernels/*.cuh) with nvcc for sm_80 and
# sm_90: each header must compile on its own, included in an otherwise empty .cu file
# (FASTNER_KERNEL_CHECK turns on the explicit template instantiations at the end of each header).
# No GPU and no CUDA torch needed. Under CI a missing nvcc is a failure, elsewhere a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  if [ "${CI:-}" = "true" ]; then echo "nvcc not found" >&2; exit 1; fi
  echo "nvcc not found: CUDA compile check skipped"; exit 0
fi
shopt -s nullglob
headers=(csrc/cuda/kernels/*.cuh)
if [ ${#headers[@]} -eq 0 ]; then echo "no CUDA kernel headers yet"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for header in "${headers[@]}"; do
  name=$(basename "$header" .cuh)
  printf '#include "%s"\n' "$PWD/$header" > "$work/$name.cu"
  for arch in 80 90; do
    "$NVCC" -std=c++17 -O2 -Icsrc -DFASTNER_KERNEL_CHECK -gencode "arch=compute_$arch,code=sm_$arch" \
      -Xcompiler -Wall -c "$work/$name.cu" -o "$work/$name.$arch.o"
    echo "ok: $header (sm_$arch)"
  done
done
