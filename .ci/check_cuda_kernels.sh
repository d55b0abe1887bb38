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

# The torch bindings (csrc/cuda/*.cu): compiled (sm_90 only; the device code is checked above)
# against the installed torch's headers. A CPU-only torch lacks one generated CUDA header,
# c10/cuda/impl/cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's own switch for
# builds without it) skips it. The bindings must therefore include only c10/cuda headers from
# the CUDA side of torch (not ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers).
PYTHON="${PYTHON:-python3}"
bindings=(csrc/cuda/*.cu)
if [ ${#bindings[@]} -gt 0 ]; then
  if ! torch_includes=$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null); then
    if [ "${CI:-}" = "true" ]; then echo "torch not importable: cannot check the CUDA bindings" >&2; exit 1; fi
    echo "torch not importable: CUDA binding check skipped"; exit 0
  fi
  # cuBLAS/cuSPARSE headers come with CUDA toolkits that ship the math libraries, not with a
  # bare nvcc: a binding that needs them (ATen/cuda/CUDAContext.h, cublas_v2.h) is checked only
  # where they exist; its device code was checked above either way.
  have_cublas=0
  if printf '#include <cublas_v2.h>\n#include <cusparse.h>\n' | "$NVCC" -x cu -E - -o /dev/null >/dev/null 2>&1; then
    have_cublas=1
  fi
  for source in "${bindings[@]}"; do
    name=$(basename "$source" .cu)
    if [ "$have_cublas" = 0 ] && grep -qE '#include <(cublas_v2|ATen/cuda/CUDAContext)\.h>' "$source"; then
      echo "skipped: $source needs cuBLAS/cuSPARSE headers, which this CUDA install lacks"
      continue
    fi
    # shellcheck disable=SC2086  (torch_includes is a list of -I flags)
    "$NVCC" -std=c++20 -O0 -Icsrc $torch_includes -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C \
      --expt-relaxed-constexpr -diag-suppress 3306 -gencode "arch=compute_90,code=sm_90" \
      -c "$source" -o "$work/binding_$name.o"
    echo "ok: $source (sm_90, against torch's headers)"
  done
fi
