#!/usr/bin/env bash
# A CUDA build toolkit from PyPI wheels, for machines without a system CUDA: nvcc, the runtime and CCCL
# headers and the libraries candle links against (cuBLAS, cuRAND, NVRTC), plus a link-time stub of
# the driver library (the real libcuda.so.1 comes with the GPU driver at run time).
#
# Pinned to CUDA 13.0: PTX from a newer nvcc than the driver's CUDA version does not load, and the
# GPUs this was checked on run driver 580 (CUDA 13.0). For an older driver pin an older 13.x or 12.x.
#
#   source <(bash scripts/cuda-toolkit.sh)     # installs once, prints the environment to use
#
# Installs into $BIFLOW_CUDA_HOME (default ~/.cache/biflow/cuda-13.0); needs python3 with pip and gcc.
set -euo pipefail
home="${BIFLOW_CUDA_HOME:-$HOME/.cache/biflow/cuda-13.0}"
root="$home/nvidia/cu13"
if [ ! -x "$root/nvvm/bin/cicc" ] || [ ! -e "$root/lib/stubs/libcuda.so" ]; then
  echo "installing the CUDA 13.0 build toolkit from PyPI into $home" >&2
  python3 -m pip install -q --no-deps --disable-pip-version-check --target "$home" \
    'nvidia-cuda-nvcc==13.0.88' 'nvidia-cuda-crt==13.0.88' 'nvidia-cuda-runtime==13.0.96' \
    'nvidia-cuda-cccl==13.0.85' 'nvidia-nvvm==13.0.88' 'nvidia-cuda-nvrtc==13.0.88' 'nvidia-cublas==13.0.2.14' 'nvidia-curand==10.4.0.35' >&2
  # The linker looks for unversioned names.
  for lib in "$root"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  # A stub of the driver API for linking: every cu* entry point cudarc declares, doing nothing.
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)
  [ -n "$cudarc" ] || { echo "cudarc's source is not in the cargo registry: run cargo fetch first" >&2; exit 1; }
  mkdir -p "$root/lib/stubs"
  grep -ohE "^ +fn cu[A-Za-z0-9_]+" "$cudarc"/src/driver/sys/mod.rs | sed "s/^ *//" | sort -u \
    | sed "s/fn \(.*\)/void \1(void) {}/" > "$root/lib/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda.c"
fi
echo "export CUDA_ROOT='$root' CUDA_HOME='$root' NVCC='$root/bin/nvcc' PATH='$root/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
