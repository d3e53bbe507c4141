#!/usr/bin/env bash
# Where does GPU time go, and what is the bf16 noise floor? One short device call:
# profile of one warm 1024² generate (FLUX2_KLEIN_PROFILE=1), and a PSNR matrix at 512² of
# flux2-klein and diffusers in bf16 and f32 on the same random full-size weights.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/flux2-gpu-out}"; mkdir -p "$OUT"; W=/tmp/probe; mkdir -p $W
LOG="$OUT/probe.log"
log() { echo "[probe $(date +%T)] $*" | tee -a "$LOG"; }
NV="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
export LD_LIBRARY_PATH="$NV:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
BIN=/tmp/flux2-klein; xz -dc carry/flux2-klein.xz > $BIN && chmod +x $BIN
which nsys ncu | tee -a "$LOG"
M=/tmp/klein4b-random
timeout 120 python3 scripts/gpu/gpu_bench.py make-model $M 2>&1 | tail -1 | tee -a "$LOG"
GIFU='A cat holding a sign that says "Gifu AI Study Group"'
log "profile: bench 1024², warm-up 1, 1 run"
FLUX2_KLEIN_PROFILE=1 timeout 90 $BIN bench -m $M --size 1024x1024 --runs 1 --warmup 1 2>&1 | tail -32 | tee -a "$LOG"
log "precision matrix at 512²"
timeout 60 $BIN -q generate -m $M -p "$GIFU" --seed 0 -W 512 -H 512 --dtype bf16 -o $W/ours_bf16.png
timeout 60 $BIN -q generate -m $M -p "$GIFU" --seed 0 -W 512 -H 512 --dtype f32 -o $W/ours_f32.png
timeout 60 python3 scripts/gpu/gpu_bench.py image $M bfloat16 512 $W/diff_bf16.png >/dev/null 2>&1
timeout 60 python3 scripts/gpu/gpu_bench.py image $M float32 512 $W/diff_f32.png >/dev/null 2>&1
for pair in "ours_bf16 diff_bf16" "diff_bf16 diff_f32" "ours_f32 diff_f32" "ours_bf16 ours_f32" "ours_bf16 diff_f32"; do
  set -- $pair; python3 scripts/gpu/gpu_bench.py psnr $W/$1.png $W/$2.png | tee -a "$LOG"
done
log done
