#!/usr/bin/env bash
# Regenerates every committed fixture under tests/fixtures with diffusers itself.
#
# Versions are pinned in refcheck/requirements.lock (torch 2.15.0, diffusers 0.42.1,
# transformers 5.24.0, pillow 13.0.0, numpy 2.4.6). refcheck/ is a copy of the team's
# reference harness (shared/refcheck): tiny random-weight Flux2KleinPipeline models of the real
# architecture, run on the CPU in float32/bfloat16 with every intermediate recorded.
#
#   reference/make_fixtures.sh            # ~5 min for the venv on a fresh machine, then ~3 min
#   FLUX2_REFENV=/path/to/venv reference/make_fixtures.sh
#
# Tests never run Python: they read what this script wrote.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
FIX="$ROOT/tests/fixtures"
VENV="${FLUX2_REFENV:-$HOME/.cache/flux2-klein-refenv}"
PY="$VENV/bin/python"

"$HERE/refcheck/setup.sh" "$VENV"

# 1. The real Qwen3 tokenizer, once; every model directory links to it.
mkdir -p "$FIX/tokenizer"
cp "$HERE/refcheck/qwen-tokenizer/tokenizer.json" "$HERE/refcheck/qwen-tokenizer/tokenizer_config.json" "$FIX/tokenizer/"

# 2. Tiny models, reference images and the standard golden cases.
(cd "$HERE/refcheck" && ./make_standard_cases.sh "$VENV")
rm -rf "$FIX/cases" "$FIX/refs"
mkdir -p "$FIX/cases" "$FIX/models"
cp -r "$HERE/refcheck/refs" "$FIX/refs"
for c in "$HERE"/refcheck/cases/*/; do
  name="$(basename "$c")"
  mkdir -p "$FIX/cases/$name"
  cp "$c"/case.json "$c"/tensors.safetensors "$c"/*.png "$FIX/cases/$name/"
done

# 3. The models in diffusers layout (tokenizer/ is a link to the one copy).
for m in tiny-w0 tiny2-w0; do
  rm -rf "$FIX/models/$m"
  mkdir -p "$FIX/models/$m"
  for part in model_index.json scheduler text_encoder transformer vae; do
    cp -r "$HERE/refcheck/models/$m/$part" "$FIX/models/$m/"
  done
  ln -s ../../tokenizer "$FIX/models/$m/tokenizer"
done
# A klein *base*-style model (is_distilled = false: CFG with the empty negative prompt), same
# weights as tiny-w0.
rm -rf "$FIX/models/tiny-base-w0"
mkdir -p "$FIX/models/tiny-base-w0"
for part in scheduler text_encoder tokenizer transformer vae; do
  ln -s "../tiny-w0/$part" "$FIX/models/tiny-base-w0/$part"
done
"$PY" - "$FIX/models/tiny-w0/model_index.json" "$FIX/models/tiny-base-w0/model_index.json" <<'PYEOF'
import json, sys
index = json.load(open(sys.argv[1]))
index["is_distilled"] = False
json.dump(index, open(sys.argv[2], "w"), indent=2)
PYEOF
# A KV-cache checkpoint (model_index.json `_class_name` Flux2KleinKVPipeline, as
# FLUX.2-klein-9b-kv), same weights as tiny-w0.
rm -rf "$FIX/models/tiny-kv-w0"
mkdir -p "$FIX/models/tiny-kv-w0"
for part in scheduler text_encoder tokenizer transformer vae; do
  ln -s "../tiny-w0/$part" "$FIX/models/tiny-kv-w0/$part"
done
"$PY" - "$FIX/models/tiny-w0/model_index.json" "$FIX/models/tiny-kv-w0/model_index.json" <<'PYEOF'
import json, sys
index = json.load(open(sys.argv[1]))
index["_class_name"] = "Flux2KleinKVPipeline"
json.dump(index, open(sys.argv[2], "w"), indent=2)
PYEOF

# 4. Component fixtures (each script documents what it writes).
for script in foundation_fixtures.py image_fixtures.py text_fixtures.py bfl_fixture.py vae_tiled_fixture.py pipeline_fixtures.py inpaint_fixtures.py kv_fixtures.py config_fixtures.py fp8_fixtures.py lora_fixtures.py lora_fp8_fixtures.py; do
  if [ -f "$HERE/$script" ]; then
    echo "[fixtures] $script"
    (cd "$ROOT" && "$PY" "$HERE/$script")
  fi
done
du -sh "$FIX"
