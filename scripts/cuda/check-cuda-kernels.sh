#!/usr/bin/env bash
# Compiles every CUDA kernel of ours with NVRTC on this machine (no GPU needed), as the binary
# does at run time on the GPU machine, and prints ptxas' register / spill report for sm_90a.
# Uses the CUDA 13.0 wheels of scripts/cuda/build-cuda.sh (CUDA_PIP_PREFIX, default
# ~/.cache/cuda13-pip) and the `cuda` build dir target-cuda.
#   scripts/cuda/check-cuda-kernels.sh     # compile check (cargo test) + ptxas report
set -euo pipefail
cd "$(dirname "$0")/../.."
build_cuda=scripts/cuda/build-cuda.sh
eval "$("$build_cuda" -e)"
cuda_lib="$CUDA_ROOT/lib"
# The test binary links libcuda.so.1 (cudarc's dynamic linking) but calls no driver function:
# the toolkit's link stub stands in for it.
stub_dir="$(mktemp -d)"
trap 'rm -rf "$stub_dir"' EXIT
ln -s "$cuda_lib/stubs/libcuda.so" "$stub_dir/libcuda.so.1"
cudnn_link="${CUDNN_LINK_DIR:-$HOME/.cache/cudnn-link}"
cudnn_lib="$(dirname "$(readlink -f "$cudnn_link/libcudnn.so")")"
export LIBRARY_PATH="$cudnn_link:$LIBRARY_PATH"
export LD_LIBRARY_PATH="$cuda_lib:$cudnn_lib:$stub_dir:${LD_LIBRARY_PATH:-}"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}" \
    cargo test --release --features cuda,cudnn --test cuda_kernels_compile -- --nocapture

echo "ptxas (sm_90a) registers and spills per kernel:"
for src in fused flash_attn flash_attn_sm90; do
    ptx="$stub_dir/$src.ptx"
    case "$src" in  # flash_attn_sm90: the Hopper (wgmma) variant, appended to flash_attn.cu
    flash_attn_sm90) cat src/cuda/kernels/flash_attn.cu src/cuda/kernels/flash_attn_sm90.cu > "$stub_dir/fa90_full.cu"
                     nvcc -arch=sm_90a -ptx -DFA_ONLY_D=0 -DFA_ONLY_BF16 -o "$ptx" "$stub_dir/fa90_full.cu" 2>/dev/null ;;
    *) nvcc -arch=sm_90a -ptx -DFA_ONLY_D=128 -o "$ptx" "src/cuda/kernels/$src.cu" ;;
    esac
    ptxas -v --gpu-name sm_90a "$ptx" -o /dev/null 2>&1 |
        awk '/Compiling entry/ {gsub(/[\047]/, "", $7); k = $7}
             /spill stores/ {sp = $5 " B spill stores"}
             /Used [0-9]+ registers/ {printf "  %-32s %4s registers, %s\n", k, $5, sp}'
done

# The flash-attention main loop's instruction mix, where cuobjdump + nvdisasm exist (not in the
# build wheels: `pip download --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`, unzip, and
# point CUOBJDUMP_BIN at the folder holding both; 13.2 reads sm_90a cubins).
PATH="${CUOBJDUMP_BIN:+$CUOBJDUMP_BIN:}$PATH"
if command -v cuobjdump >/dev/null && command -v nvdisasm >/dev/null; then
    echo "flash attention main loop (sm_90a SASS, one K/V tile):"
    for d in 64 128 256; do
        ptx="$stub_dir/fa$d.ptx"
        nvcc -arch=sm_90a -ptx -DFA_ONLY_D=$d -o "$ptx" src/cuda/kernels/flash_attn.cu
        ptxas --gpu-name sm_90a "$ptx" -o "$stub_dir/fa$d.cubin"
        k="$(grep -o "fa_fwd_bf16_d${d}_[a-z0-9_]*" "$ptx" | head -1)"
        cuobjdump -sass -fun "$k" "$stub_dir/fa$d.cubin" > "$stub_dir/fa$d.sass"
        echo "  $k: $(python3 tests/kernel_emu/sass_loop_mix.py "$stub_dir/fa$d.sass" | tr "\n" " ")"
    done
    cat src/cuda/kernels/flash_attn.cu src/cuda/kernels/flash_attn_sm90.cu > "$stub_dir/fa90_full.cu"
    nvcc -arch=sm_90a -ptx -DFA_ONLY_D=0 -DFA_ONLY_BF16 -o "$stub_dir/fa90.ptx" "$stub_dir/fa90_full.cu" 2>/dev/null
    ptxas --gpu-name sm_90a "$stub_dir/fa90.ptx" -o "$stub_dir/fa90.cubin"
    for k in fa90_fwd_bf16_d128 fa90_fwd_bf16_d128_n128; do
        cuobjdump -sass -fun "$k" "$stub_dir/fa90.cubin" > "$stub_dir/$k.sass"
        echo "  $k: $(python3 tests/kernel_emu/sass_loop_mix.py "$stub_dir/$k.sass" | tr "\n" " ")"
    done
fi
