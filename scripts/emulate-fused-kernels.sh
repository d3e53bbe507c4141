#!/usr/bin/env bash
# Runs the kernels of src/cuda/fused.cu on the CPU, launched as src/cuda/fused.rs launches
# them, against PyTorch's bf16 ops (scripts/kernel_emu/). No GPU and no CUDA toolkit needed:
# g++ (C++20) and the reference venv's torch (reference/refcheck/setup.sh). Catches indexing,
# stride and reduction mistakes before a GPU run; a missing barrier shows only by chance.
# flash_attn.cu is inline PTX and is not emulated. Takes ~30 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/kernel_emu"
PY="${FLUX2_REFENV:-$HOME/.cache/flux2-klein-refenv}/bin/python"
lib="$(mktemp -d)/fused_emu.so"
trap 'rm -rf "$(dirname "$lib")"' EXIT
g++ -std=c++20 -O2 -shared -fPIC -Wall -Wno-unknown-pragmas -Wno-sign-compare -pthread \
    -o "$lib" fused_emu.cpp
"$PY" check_fused.py "$lib"
