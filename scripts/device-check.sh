#!/usr/bin/env bash
# The GPU check of the CUDA backend. The GPU machine needs an NVIDIA driver and the CUDA 13 libraries
# (cuBLAS, cuRAND, NVRTC: a CUDA toolkit or PyTorch's nvidia wheels), but no Rust or Node: the
# binary is built beforehand, on any x86-64 Linux machine, with the cuda feature.
#
#   bash scripts/device-check.sh --build        # build machine: .device/bin/device_check (CUDA 13.0 from PyPI)
#   bash scripts/device-check.sh [OUT.json]     # GPU machine: run it (about 3 minutes on one H200)
#
# It checks F on the GPU against the reference fixture and the CPU, training and distillation steps,
# the reverse-vs-exact sampling speed at T = 256 and training throughput, and writes one JSON file
# (see crates/biflow-core/examples/device_check.rs for what each number is).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.device/bin/device_check

if [ "${1:-}" = "--build" ]; then
  # shellcheck disable=SC1090
  source <(bash scripts/cuda-toolkit.sh)
  CARGO_TARGET_DIR=target/cuda cargo build --release -p biflow-core --features cuda --example device_check
  mkdir -p "$(dirname "$bin")"
  cp target/cuda/release/examples/device_check "$bin"
  strip "$bin"
  # Compressed to travel (the PTX of candle's kernels makes the binary large).
  gzip -9 -c "$bin" > "$bin.gz"
  ls -la "$bin" "$bin.gz"
  exit 0
fi

out="${1:-device-check.json}"
shift || true  # the rest goes to device_check (e.g. --only train)
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then gunzip -c "$bin.gz" > "$bin" && chmod +x "$bin"; fi
[ -x "$bin" ] || { echo "no $bin: build it first with: bash scripts/device-check.sh --build" >&2; exit 2; }
# Where the CUDA 13 libraries are: a system toolkit, or the nvidia wheels of a Python environment.
roots="/usr/local/cuda /usr/local/cuda-13.0 $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
dirs=""
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  d=$(find $roots -name "$lib" -printf '%h\n' 2>/dev/null | head -1 || true)
  [ -n "$d" ] && dirs="$dirs:$d"
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed" >&2
if ldd "$bin" | grep "not found"; then
  echo "libraries missing (above): install the CUDA 13 runtime libraries or point LD_LIBRARY_PATH at them" >&2
  exit 1
fi
timeout "${BIFLOW_CHECK_TIMEOUT:-480}" "$bin" --device "${BIFLOW_DEVICE:-cuda:0}" --fixtures fixtures --out "$out" "$@"
