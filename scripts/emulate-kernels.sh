#!/usr/bin/env bash
# Our CUDA kernels on the CPU (scripts/kernel_emu/), no GPU and no CUDA toolkit needed:
#  * src/cuda/fused.cu: every kernel runs, launched as src/cuda/fused.rs launches it, against
#    PyTorch's bf16 ops (needs the reference venv's torch: reference/refcheck/setup.sh);
#  * src/cuda/flash_attn.cu: its tensor-core code is inline PTX, so only its index
#    arithmetic (which chunk each thread copies, each lane's ldmatrix addresses) is checked.
# g++ (C++20). Catches indexing, stride and reduction mistakes before a GPU run; a missing
# barrier shows only by chance. Takes ~30 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/kernel_emu"
PY="${FLUX2_REFENV:-$HOME/.cache/flux2-klein-refenv}/bin/python"
lib="$(mktemp -d)/fused_emu.so"
trap 'rm -rf "$(dirname "$lib")"' EXIT
flags=(-std=c++20 -Wall -Wno-unknown-pragmas -Wno-sign-compare -pthread)
g++ "${flags[@]}" -O1 -o "$(dirname "$lib")/fa_index_check" fa_index_check.cpp
"$(dirname "$lib")/fa_index_check"
g++ "${flags[@]}" -O2 -shared -fPIC -o "$lib" fused_emu.cpp
"$PY" check_fused.py "$lib"
