#!/usr/bin/env bash
# GPU check and benchmark, flux2-klein vs diffusers on the same card, in one run (< 10 min).
#
# Runs on a GPU machine with python3 + torch + transformers (diffusers may come as a wheel in
# .whl/). Needs the CUDA binary, built elsewhere with scripts/cuda/build-cuda.sh and carried as
# carry/flux2-klein.xz (strip + xz), and optionally carry/cuda_gpu.xz (the test executable
# of tests/cuda_gpu/, every kernel test). Writes logs, JSON and images under $OUT.
#
#   scripts/gpu/gpu.sh                 # everything
#   GPU_SKIP_FULL=1 scripts/gpu/gpu.sh # only the tiny-model correctness checks
#   GPU_SKIP_AB=1, GPU_SKIP_COLD=1     # skip the speed-paths-off run / the cold-start runs
#   GPU_SKIP_ATTN=1                    # skip the attention-kernel check and timings
#   GPU_SKIP_FP8=1                     # skip the fp8 runs (--quantize fp8 at 1024²)
#   GPU_RUNS=2, DIFFUSERS_RUNS=3       # timed runs per workload (after one warm-up), ours / diffusers
#   GPU_BUDGET_S=570                   # optional steps are skipped (and logged) when the time left
#                                      # in this budget is short, so the core numbers come back
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/flux2-gpu-out}"; mkdir -p "$OUT"
# At most a few files come back from a device call: logs/JSON/two images in $OUT, the rest in $WORK.
WORK=/tmp/flux2-gpu-work; mkdir -p "$WORK"
LOG="$OUT/gpu.log"
log() { echo "[gpu.sh $(date +%T)] $*" | tee -a "$LOG"; }
# One device call has 600 s: the optional steps below run only while enough of the budget
# (GPU_BUDGET_S, default 570 s from the start of this script) is left, so the core numbers
# always come back. Before the diffusers run an optional step asks for its own time plus
# diffusers' (~200 s); the attention-kernel A/B comes right after it, the rest last.
left() { echo $(( ${GPU_BUDGET_S:-570} - SECONDS )); }
have() {  # seconds a step needs, its name
  local remaining; remaining=$(left)
  [ "$remaining" -ge "$1" ] && return 0
  log "skipped: $2 (needs ~$1 s, $remaining s left)"; return 1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"

# Runtime libraries of the binary: PyTorch's bundled CUDA 13 libraries (cudart, cublas,
# curand, nvrtc in nvidia/cu13/lib; cuDNN for the `cudnn` feature in nvidia/cudnn/lib).
NV="$(python3 -c 'import nvidia, os; p = list(nvidia.__path__)[0]; print(":".join(os.path.join(p, d, "lib") for d in ("cu13", "cudnn") if os.path.isdir(os.path.join(p, d, "lib"))))')"
export LD_LIBRARY_PATH="$NV:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
BIN=/tmp/flux2-klein
xz -dc carry/flux2-klein.xz > "$BIN" && chmod +x "$BIN" || { log "no carried binary"; exit 1; }
"$BIN" --version | tee -a "$LOG"
# A binary built from other sources than this tree would be measured as if it were this code.
built="$(cut -d' ' -f1 carry/SOURCE 2>/dev/null)"; here="$(bash scripts/cuda/source-hash.sh)"
if [ "$built" = "$here" ]; then log "binary built from this tree ($(cat carry/SOURCE))"
else log "WARNING: the carried binary was built from other sources (${built:-unknown} vs $here): rebuild and repack"; fi

# 1. Tiny fixtures on CUDA in f32: equal to the CPU/diffusers image within 1/255.
GIFU='A cat holding a sign that says "Gifu AI Study Group"'
M=tests/fixtures/models; C=tests/fixtures/cases
tiny() {  # name, golden, args...
  local name="$1" golden="$2"; shift 2
  "$BIN" -q generate "$@" --device cuda --dtype f32 -o "$WORK/$name.png" >>"$LOG" 2>&1 \
    && python3 scripts/gpu/gpu_bench.py psnr "$golden" "$WORK/$name.png" | tee -a "$LOG"
}
tiny cuda_f32_t2i_64x64 $C/t2i_64x64/image.png -m $M/tiny-w0 -p "$GIFU" --seed 0 -W 64 -H 64
[ -z "${GPU_QUICK:-}" ] && tiny cuda_f32_edit2_64x64 $C/edit2_64x64/image.png -m $M/tiny-w0 -p "$GIFU" --seed 0 -W 64 -H 64 \
  -r $C/edit2_64x64/ref_0.png -r $C/edit2_64x64/ref_1.png
[ -z "${GPU_QUICK:-}" ] && tiny cuda_f32_tiny2_edit $C/tiny2_edit_64x128/image.png -m $M/tiny2-w0 -p "a red fox in snow" --seed 42 \
  -W 128 -H 64 -r $C/tiny2_edit_64x128/ref_0.png
"$BIN" -q generate -m $M/tiny-w0 -p "$GIFU" --seed 0 -W 64 -H 64 --device cuda --dtype bf16 -o "$WORK/cuda_bf16_t2i.png" >>"$LOG" 2>&1 \
  && python3 scripts/gpu/gpu_bench.py psnr $C/t2i_64x64_bf16/image.png "$WORK/cuda_bf16_t2i.png" | tee -a "$LOG"
# fp8 weights kept in fp8 on the GPU (dequantised per layer at each forward): BFL's fp8 layout
# and --quantize fp8, against diffusers on the dequantised weights (tests/parity_fp8.rs on CPU).
tiny cuda_f32_fp8_bfl $C/fp8_bfl_t2i/image.png -m $M/tiny-w0 -p "$GIFU" --seed 0 -W 64 -H 64 \
  --transformer tests/fixtures/fp8/tiny-w0-fp8-bfl.safetensors
tiny cuda_f32_quantize_fp8 $C/quantize_fp8_t2i/image.png -m $M/tiny-w0 -p "$GIFU" --seed 0 -W 64 -H 64 --quantize fp8

# 2. Our kernels against their references (tests/cuda_gpu: fused kernels, cuDNN convs, the
# flash-attention kernels incl. the text encoder's causal one).
if [ -f carry/cuda_gpu.xz ]; then
  xz -dc carry/cuda_gpu.xz > /tmp/cuda_gpu && chmod +x /tmp/cuda_gpu
  timeout 150 /tmp/cuda_gpu --nocapture --test-threads 1 2>&1 |
    grep -E "rel err|max abs err|causal|test result|panicked|skipped|FAIL|NVRTC|TFLOP|ms" | tail -70 | tee -a "$LOG"
fi
# The attention kernel alone (NVRTC through ctypes, torch tensors): correctness for every head
# dim and layout against f32 math, then its time at 1024² (and tilings) vs torch's FA2/cuDNN.
[ -z "${GPU_SKIP_ATTN:-}" ] && have 400 "attention kernel check" && timeout 100 scripts/gpu/gpu_attention_check.sh kernel 2>&1 |
  grep -vE "^  (OK) " | tail -30 | tee -a "$LOG"
[ -n "${GPU_SKIP_FULL:-}" ] && exit 0

# 3. Full-size random klein-4B: diffusers vs flux2-klein, same weights, same noise.
MODEL=/tmp/klein4b-random; REFS=/tmp/refs
log "writing the random full-size checkpoint"
timeout 170 python3 scripts/gpu/gpu_bench.py make-model "$MODEL" 2>&1 | tail -3 | tee -a "$LOG"
python3 scripts/gpu/gpu_bench.py refs "$REFS"
du -sh "$MODEL" | tee -a "$LOG"

log "flux2-klein: cold generate 1024² (process start to file written)"
t0=$(date +%s.%N)
timeout 90 "$BIN" -v generate -m "$MODEL" -p "$GIFU" --seed 0 -W 1024 -H 1024 -o "$OUT/ours_t2i_1024.png" 2>&1 | tail -8 | tee -a "$LOG"
t1=$(date +%s.%N); python3 -c "print(round($t1-$t0,2))" > "$OUT/ours_cold_s"; log "ours cold: $(cat "$OUT/ours_cold_s") s"
# Its peak device memory (text encoder freed before the transformer loads): the "lean" bar.
grep -o 'peak device memory: [0-9.]* GiB' "$LOG" | tail -1 | awk '{print $4}' > "$OUT/ours_generate_peak_gib"

log "flux2-klein bench (warm, everything resident)"
timeout 130 "$BIN" bench -m "$MODEL" --size 1024x1024 --size 512x512 --runs ${GPU_RUNS:-2} --warmup 1 --json > "$OUT/ours_bench.json" 2>>"$LOG"
timeout 110 "$BIN" bench -m "$MODEL" --size 1024x1024 -r $REFS/ref0.png -r $REFS/ref1.png --runs ${GPU_RUNS:-2} --warmup 1 --json > "$OUT/ours_bench_edit.json" 2>>"$LOG"
python3 -c "
import json,sys
for f in ['$OUT/ours_bench.json','$OUT/ours_bench_edit.json']:
    try: d=json.load(open(f))
    except Exception as e: print(f, 'unreadable', e); continue
    print(json.dumps(d.get('summary', d), indent=None)[:1500])
" | tee -a "$LOG"

# 3a. fp8 (issue #18): --quantize fp8 (transformer block linears + text encoder linears kept in
# fp8, dequantised per layer; no fp8 GEMM yet): one generate's peak memory (bf16: the lean bar
# above), its PSNR against our bf16 image, and the warm step time.
if [ -z "${GPU_SKIP_FP8:-}" ] && have 300 "fp8 runs"; then
  log "flux2-klein --quantize fp8: generate 1024² and warm bench"
  timeout 90 "$BIN" -v generate -m "$MODEL" --quantize fp8 -p "$GIFU" --seed 0 -W 1024 -H 1024 -o "$WORK/ours_fp8_t2i_1024.png" 2>&1 | tail -8 | tee -a "$LOG"
  grep -o 'peak device memory: [0-9.]* GiB' "$LOG" | tail -1 | awk '{print $4}' > "$OUT/ours_fp8_generate_peak_gib"
  log "fp8 generate peak: $(cat "$OUT/ours_fp8_generate_peak_gib") GiB (bf16: $(cat "$OUT/ours_generate_peak_gib") GiB)"
  python3 scripts/gpu/gpu_bench.py psnr "$OUT/ours_t2i_1024.png" "$WORK/ours_fp8_t2i_1024.png" | tee -a "$LOG"
  timeout 100 "$BIN" bench -m "$MODEL" --quantize fp8 --size 1024x1024 --runs ${GPU_RUNS:-2} --warmup 1 --json > "$OUT/ours_bench_fp8.json" 2>>"$LOG"
  python3 -c "
import json
try: d=json.load(open('$OUT/ours_bench_fp8.json')); print('fp8', json.dumps(d.get('summary', d))[:600])
except Exception as e: print('fp8 bench unreadable', e)
" | tee -a "$LOG"
fi

# 3b. A binary of an earlier commit (carry/flux2-klein-base.xz, from pack-gpu-carry.sh with
# BASE_BIN): the same 1024² image and warm bench, for changes that must move neither images nor
# speed (e.g. issue #16: PSNR vs the earlier image >= 60 dB or identical, total within 3 %).
if [ -f carry/flux2-klein-base.xz ] && have 420 "A/B against the base binary"; then
  BASE=/tmp/flux2-klein-base; xz -dc carry/flux2-klein-base.xz > "$BASE" && chmod +x "$BASE"
  log "A/B: base binary $(cat carry/BASE_SOURCE 2>/dev/null) against this one"
  timeout 90 "$BASE" -q generate -m "$MODEL" -p "$GIFU" --seed 0 -W 1024 -H 1024 -o "$OUT/base_t2i_1024.png" 2>>"$LOG"
  python3 scripts/gpu/gpu_bench.py psnr "$OUT/base_t2i_1024.png" "$OUT/ours_t2i_1024.png" | tee -a "$LOG"
  timeout 130 "$BASE" bench -m "$MODEL" --size 1024x1024 --runs ${GPU_RUNS:-2} --warmup 1 --json > "$OUT/base_bench.json" 2>>"$LOG"
  python3 - "$OUT/base_bench.json" "$OUT/ours_bench.json" <<'PY' | tee -a "$LOG"
import json, sys
def total(path):
    rows = json.load(open(path))["summary"]
    row = next(r for r in rows if (r["width"], r["height"]) == (1024, 1024))
    return row["total_ms"]["mean"]
try:
    base, ours = total(sys.argv[1]), total(sys.argv[2])
    print(json.dumps({"base_total_ms": round(base, 1), "ours_total_ms": round(ours, 1),
                      "ours_over_base": round(ours / base, 4)}))
except Exception as e:
    print(json.dumps({"error": f"base A/B unreadable: {e}"}))
PY
fi

if [ -z "${GPU_SKIP_AB:-}" ] && have 420 "A/B with the speed paths off"; then
  log "A/B: the same bench with our CUDA speed paths off (FLUX2_KLEIN_FUSED=0: candle ops, candle's cuDNN conv)"
  FLUX2_KLEIN_FUSED=0 timeout 90 "$BIN" bench -m "$MODEL" --size 1024x1024 --runs 1 --warmup 1 2>&1 | tail -6 | tee -a "$LOG"
fi

have 330 "profile" && log "flux2-klein profile of one warm 1024² run (FLUX2_KLEIN_PROFILE=1)" &&
FLUX2_KLEIN_PROFILE=1 timeout 60 "$BIN" bench -m "$MODEL" --size 1024x1024 --runs 1 --warmup 1 2>&1 | tail -18 | tee -a "$LOG"

log "diffusers: warm per-stage timings"
d_limit=$(left); d_limit=$(( d_limit - 20 > 180 ? 180 : (d_limit - 20 < 60 ? 60 : d_limit - 20) ))
timeout $d_limit env DIFFUSERS_WORKLOADS="${DIFFUSERS_WORKLOADS:-}" DIFFUSERS_RUNS="${DIFFUSERS_RUNS:-3}" python3 scripts/gpu/gpu_bench.py diffusers "$MODEL" "$WORK" "$REFS" 2>&1 | grep -E "^(t2i|edit)" | tee -a "$LOG"
cp "$WORK/diffusers.json" "$WORK/diffusers_t2i_1024.png" "$OUT/" 2>/dev/null
python3 scripts/gpu/gpu_bench.py psnr "$OUT/diffusers_t2i_1024.png" "$OUT/ours_t2i_1024.png" | tee -a "$LOG"

# The attention kernels against each other: the default on Hopper is the wgmma kernel with
# 128-key tiles (it self-checks at load and falls back with a warning); the same warm benches
# with the mma.sync kernel (the default elsewhere) and the 64-key-tile wgmma kernel.
if have 240 "attention kernel A/B"; then
  log "A/B: FLUX2_KLEIN_ATTN=mma (the mma.sync kernel) and FLUX2_KLEIN_ATTN=wgmma (64-key tiles)"
  FLUX2_KLEIN_ATTN=mma timeout 100 "$BIN" bench -m "$MODEL" --size 1024x1024 --runs 2 --warmup 1 --json > "$OUT/ours_bench_mma.json" 2>>"$LOG"
  FLUX2_KLEIN_ATTN=mma timeout 100 "$BIN" bench -m "$MODEL" --size 1024x1024 -r $REFS/ref0.png -r $REFS/ref1.png --runs 2 --warmup 1 --json > "$OUT/ours_bench_edit_mma.json" 2>>"$LOG"
  FLUX2_KLEIN_ATTN=wgmma timeout 100 "$BIN" bench -m "$MODEL" --size 1024x1024 --runs 2 --warmup 1 --json > "$OUT/ours_bench_wgmma.json" 2>>"$LOG"
  FLUX2_KLEIN_ATTN=mma timeout 60 "$BIN" -q generate -m "$MODEL" -p "$GIFU" --seed 0 -W 1024 -H 1024 -o "$OUT/ours_t2i_1024_mma.png" 2>>"$LOG"
  python3 scripts/gpu/gpu_bench.py psnr "$OUT/ours_t2i_1024.png" "$OUT/ours_t2i_1024_mma.png" | tee -a "$LOG"
  python3 scripts/gpu/gpu_bench.py psnr "$OUT/diffusers_t2i_1024.png" "$OUT/ours_t2i_1024_mma.png" | tee -a "$LOG"
fi

if have 90 "bf16 noise floor"; then
  log "bf16 noise floor: diffusers bf16 vs diffusers f32 fed the bf16 run's timesteps, 1024² (same weights and noise)"
  timeout $(( $(left) - 10 )) python3 scripts/gpu/gpu_bench.py image "$MODEL" float32 1024 "$WORK/diffusers_f32_1024.png" bf16 >/dev/null 2>&1
  python3 scripts/gpu/gpu_bench.py psnr "$OUT/diffusers_t2i_1024.png" "$WORK/diffusers_f32_1024.png" | tee -a "$LOG"
  python3 scripts/gpu/gpu_bench.py psnr "$OUT/ours_t2i_1024.png" "$WORK/diffusers_f32_1024.png" | tee -a "$LOG"
fi

finish() { python3 scripts/gpu/gpu_bench.py verdict "$OUT" 2>&1 | tee -a "$LOG"; log done; exit 0; }
{ [ -n "${GPU_SKIP_COLD:-}" ] || ! have 60 "diffusers cold start"; } && finish
log "diffusers: cold (fresh process, from_pretrained + call)"
t0=$(date +%s.%N)
timeout $(( $(left) - 5 )) python3 scripts/gpu/gpu_bench.py cold "$MODEL" "$WORK/diffusers_cold.png" >/dev/null 2>&1
t1=$(date +%s.%N); python3 -c "print(round($t1-$t0,2))" > "$OUT/diffusers_cold_s"; log "diffusers cold: $(cat "$OUT/diffusers_cold_s") s"
finish
