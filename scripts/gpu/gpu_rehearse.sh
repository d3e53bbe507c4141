#!/usr/bin/env bash
# Rehearses scripts/gpu/gpu.sh on a machine without a GPU: the same script, run on a copy of this
# tree, with stand-ins for nvidia-smi, the carried binary (it writes a fixture image wherever
# -o points and prints a bench JSON) and python3 (the GPU steps of gpu_bench.py are stubbed;
# psnr and verdict run for real in the reference venv). A device call is scarce: this catches
# a shell mistake, a wrong path or a step order that would lose the run, before it happens.
#   scripts/gpu/gpu_rehearse.sh        # prints the log; exit 1 if gpu.sh did not reach "done"
# Needs the reference venv (reference/refcheck/setup.sh) for numpy/PIL.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
REAL_PY="${FLUX2_REFENV:-$HOME/.cache/flux2-klein-refenv}/bin/python"
[ -x "$REAL_PY" ] || { echo "no reference venv at $REAL_PY (reference/refcheck/setup.sh)" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin" "$tmp/tree"
# The tree as the device tool copies it: tracked and untracked-but-not-ignored files.
(cd "$here" && git ls-files -co --exclude-standard -z | xargs -0 cp -a --parents -t "$tmp/tree")
mkdir -p "$tmp/tree/carry"
[ -d "$here/.whl" ] && cp -r "$here/.whl" "$tmp/tree/"
img="$here/tests/fixtures/cases/t2i_64x64/image.png"
refs="$here/tests/fixtures/cases/edit2_64x64"

cat > "$tmp/flux2-klein" <<EOF
#!/usr/bin/env bash
echo "stand-in flux2-klein \$*" >&2
case " \$* " in *" --version "*) echo "flux2-klein (stand-in)"; exit 0;; esac
out=""; prev=""
for a in "\$@"; do [ "\$prev" = "-o" ] && out="\$a"; prev="\$a"; done
[ -n "\$out" ] && cp "$img" "\$out" && echo "\$out"
case " \$* " in *" bench "*" --json "*)
  echo '{"attention_kernel": "stand-in", "summary": [{"width": 1024, "height": 1024, "refs": 0, "total_ms": {"mean": 1.0}}]}';;
esac
exit 0
EOF
xz -c "$tmp/flux2-klein" > "$tmp/tree/carry/flux2-klein.xz"
echo "$(cd "$tmp/tree" && bash scripts/cuda/source-hash.sh) rehearsal" > "$tmp/tree/carry/SOURCE"

cat > "$tmp/bin/nvidia-smi" <<'EOF'
#!/bin/sh
echo "stand-in GPU, 0.0, 0 MiB"
EOF
cat > "$tmp/bin/python3" <<EOF
#!/usr/bin/env bash
if [ "\$1" = "-c" ]; then case "\$2" in *"import nvidia"*) echo "$tmp/nvlib"; exit 0;; esac; exec "$REAL_PY" "\$@"; fi
if [ "\$1" = "-m" ] && [ "\$2" = "pip" ]; then exit 0; fi
if [ "\$1" = "-" ]; then cat > /dev/null; echo "stand-in: inline python skipped"; exit 0; fi
if [ "\$1" = "scripts/gpu/gpu_bench.py" ]; then
  case "\$2" in
    psnr|verdict) exec "$REAL_PY" "\$@";;
    make-model) mkdir -p "\$3"; exit 0;;
    refs) mkdir -p "\$3"; cp "$refs/ref_0.png" "\$3/ref0.png"; cp "$refs/ref_1.png" "\$3/ref1.png"; exit 0;;
    diffusers) cp "$img" "\$4/diffusers_t2i_1024.png"
               echo '{"t2i_1024": {"runs": [{"total_ms": 1.0, "text_encode_ms": 1.0}], "peak_gib": 1.0}}' > "\$4/diffusers.json"
               echo "t2i_1024 (stand-in)"; exit 0;;
    image) cp "$img" "\$6"; exit 0;;
    cold) cp "$img" "\$4"; exit 0;;
  esac
fi
echo "stand-in python3: \$*" >&2
exit 0
EOF
chmod +x "$tmp/bin/"*
cd "$tmp/tree"
PATH="$tmp/bin:$PATH" OUT="$tmp/out" timeout 300 bash scripts/gpu/gpu.sh > "$tmp/log" 2>&1 || true
grep -v '^stand-in flux2-klein' "$tmp/log"
if grep -qE 'unbound variable|command not found|syntax error|Traceback' "$tmp/log" || ! grep -q '\] done$' "$tmp/log"; then
  echo "REHEARSAL FAILED: see the log above" >&2
  exit 1
fi
echo "rehearsal ok: gpu.sh ran to the end"
