#!/usr/bin/env bash
# Our CUDA kernels on the CPU (tests/kernel_emu/), no GPU and no CUDA toolkit needed:
#  * src/cuda/kernels/fused.cu: every kernel runs, launched as src/cuda/fused/ launches it, against
#    PyTorch's bf16 ops (needs the reference venv's torch: reference/refcheck/setup.sh);
#  * src/cuda/kernels/flash_attn.cu: its index arithmetic exhaustively (fa_index_check.cpp), then the
#    whole kernel with its inline-PTX helpers (ldmatrix, mma.sync, cp.async, cvt) emulated per
#    warp (ptx_emu.hpp) against attention in double precision (fa_selftest.cpp, as CI runs it).
#    FA_OTHER_REV=<git rev> also builds that revision's kernel and requires bit-identical
#    outputs (for rewrites that must not change the arithmetic).
# g++ (C++20). Catches indexing, stride and reduction mistakes before a GPU run; a missing
# barrier shows only by chance. Takes ~45 s on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../../tests/kernel_emu"
PY="${FLUX2_REFENV:-$HOME/.cache/flux2-klein-refenv}/bin/python"
lib="$(mktemp -d)/fused_emu.so"
trap 'rm -rf "$(dirname "$lib")"' EXIT
flags=(-std=c++20 -Wall -Wno-unknown-pragmas -Wno-sign-compare -pthread)
g++ "${flags[@]}" -O1 -o "$(dirname "$lib")/fa_index_check" fa_index_check.cpp
"$(dirname "$lib")/fa_index_check"
tmp="$(dirname "$lib")"
g++ "${flags[@]}" -O2 -DFA_SOURCE='"../../src/cuda/kernels/flash_attn.cu"' \
  -DFA_SM90_SOURCE='"../../src/cuda/kernels/flash_attn_sm90.cu"' -o "$tmp/fa_selftest" fa_selftest.cpp
"$tmp/fa_selftest" | tee "$tmp/fa_this.txt"
# FA_FUZZ=N: N random shapes more through both Hopper variants.
if [ -n "${FA_FUZZ:-}" ]; then
  fuzz_rc=0; "$tmp/fa_selftest" fuzz "$FA_FUZZ" > "$tmp/fuzz.txt" || fuzz_rc=$?
  grep -v '^ok' "$tmp/fuzz.txt" || echo "ok   flash90 fuzz: $(wc -l < "$tmp/fuzz.txt") random cases"
  [ "$fuzz_rc" = 0 ] || exit 1
fi
if [ -n "${FA_OTHER_REV:-}" ]; then
  # The other revision's helpers get the same FLUX2_KERNEL_EMU guard if they lack it.
  # (src/cuda/flash_attn.cu before the kernels moved to src/cuda/kernels/.)
  { git show "$FA_OTHER_REV:src/cuda/kernels/flash_attn.cu" 2>/dev/null ||
    git show "$FA_OTHER_REV:src/cuda/flash_attn.cu"; } | "$PY" -c '
import sys; s = sys.stdin.read()
if "FLUX2_KERNEL_EMU" not in s:
    s = s.replace("DEVI u32 smem_u32(", "#ifndef FLUX2_KERNEL_EMU\nDEVI u32 smem_u32(", 1)
    i = s.index("DEVI float fast_exp2("); j = s.index("}\n", i) + 2
    s = s[:j] + "#endif\n" + s[j:]
sys.stdout.write(s)' > "$tmp/fa_other.cu"
  g++ "${flags[@]}" -w -O2 -DFA_SOURCE="\"$tmp/fa_other.cu\"" -o "$tmp/fa_other" fa_selftest.cpp
  "$tmp/fa_other" > "$tmp/fa_other.txt" || true
  # The cases both revisions run (the Hopper variant's "flash90" lines are this one's only).
  if diff <(awk '/ flash B=/ {print $NF}' "$tmp/fa_this.txt") <(awk '/ flash B=/ {print $NF}' "$tmp/fa_other.txt") >/dev/null; then
    echo "ok   flash outputs bit-identical to $FA_OTHER_REV's kernel in every case"
  else
    echo "FAIL flash outputs differ from $FA_OTHER_REV's kernel:"; paste "$tmp/fa_this.txt" "$tmp/fa_other.txt"
    exit 1
  fi
fi
g++ "${flags[@]}" -O2 -shared -fPIC -o "$lib" fused_emu.cpp
"$PY" check_fused.py "$lib"
