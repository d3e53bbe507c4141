#!/usr/bin/env bash
# Packs the CUDA build for a device run of scripts/gpu/gpu.sh: strips and xz-compresses the binary
# and the GPU test executable (tests/cuda_gpu/: every kernel test in one binary) into carry/
# (git-ignored; pass `carry` to the device tool). The device copy of the tree is limited to
# 64 MiB and the tracked files take ~46 MB (+ 6.4 MB of wheels in .whl/); xz -9e: ~13 MB.
# Build first, e.g.:
#   eval "$(scripts/cuda/build-cuda.sh -e)"; CARGO_TARGET_DIR=target-cuda \
#     cargo build --release --features cuda,cudnn --all-targets
# BASE_BIN=PATH also packs a binary of an earlier commit as carry/flux2-klein-base.xz (with
# BASE_SOURCE, e.g. its commit, in carry/BASE_SOURCE): gpu.sh then A/Bs images and speed
# against it. Build it in a worktree of that commit with the same CARGO_TARGET_DIR (only the
# crate itself recompiles) and copy the binary out before building this tree again.
set -euo pipefail
cd "$(dirname "$0")/../.."
T="${CARGO_TARGET_DIR:-target-cuda}/release"
# Never carry a binary whose kernels fail NVRTC: that would first show on the GPU machine.
[ -n "${SKIP_KERNEL_CHECK:-}" ] || scripts/cuda/check-cuda-kernels.sh >/dev/null 2>&1 ||
  { echo "CUDA kernels fail to compile: run scripts/cuda/check-cuda-kernels.sh" >&2; exit 1; }
mkdir -p carry
# What the binary was built from, checked by scripts/gpu/gpu.sh against the tree it runs in.
echo "$(scripts/cuda/source-hash.sh) $(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo -dirty)" > carry/SOURCE
echo "carry/SOURCE $(cat carry/SOURCE)"
pack() {  # source, name
  strip -o "carry/$2" "$1" && xz -T0 -9e -f "carry/$2"
  echo "carry/$2.xz $(du -h "carry/$2.xz" | cut -f1)"
}
pack "$T/flux2-klein" flux2-klein
if [ -n "${BASE_BIN:-}" ]; then
  pack "$BASE_BIN" flux2-klein-base
  echo "${BASE_SOURCE:-unknown}" > carry/BASE_SOURCE
fi
rm -f carry/cuda_attention.xz carry/cuda_fused.xz  # the separate test binaries of before
for t in cuda_gpu; do
  exe="$(ls -t "$T"/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
  [ -n "$exe" ] && pack "$exe" "$t"
done
