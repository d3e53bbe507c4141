"""LoRA adapters on fp8 transformers, for tests/parity_lora_fp8.rs.

Run with the refenv python from the repository root, after fp8_fixtures.py and
lora_fixtures.py (make_fixtures.sh does):

    ~/.cache/flux2-klein-refenv/bin/python reference/lora_fp8_fixtures.py

Reads the committed fixtures tests/fixtures/fp8/tiny-w0-fp8-bfl.safetensors (BFL's fp8
layout of tiny-w0's transformer) and tests/fixtures/lora/{peft,kohya}.safetensors, and writes
per case tests/fixtures/cases/<case>/{case.json,image.png}: diffusers 0.42.1
`Flux2KleinPipeline` on tiny-w0, f32, 64×64, 4 steps, seed 0, with

  * lora_fp8_bfl_t2i: the transformer's weights replaced by the fp8 file's, dequantised as
    `f32(q) · weight_scale` (as fp8_fixtures.py does: diffusers' single-file loader cannot
    read the file), then `pipe.load_lora_weights(peft.safetensors)` +
    `pipe.set_adapters([name], [0.8])`;
  * lora_quantize_fp8_t2i: `--quantize fp8`: tiny-w0's transformer block linears and
    text-encoder linears round-tripped through per-tensor E4M3 (amax/448), then the kohya
    adapter at scale 1.0.

So the adapter's delta is added to the dequantised (or round-tripped) weight, unquantised:
peft adds `scale · B(A x)` beside the base layer in f32.
"""

import json
import os

import torch
from safetensors.torch import load_file

from diffusers import Flux2KleinPipeline
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
)

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(FIX, "models", "tiny-w0")
FP8_FILE = "fp8/tiny-w0-fp8-bfl.safetensors"
PROMPT = 'A cat holding a sign that says "Gifu AI Study Group"'
SIZE = 64
STEPS = 4
SEED = 0
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantized_fp8_file(path):
    """The diffusers state dict the BFL fp8 file means: fp8 weights times their scalar
    `weight_scale`, everything in f32 (scales dropped)."""
    raw = load_file(path)
    plain = {}
    for name, t in raw.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        if t.dtype in FP8_TYPES:
            t = t.to(torch.float32) * raw[f"{name[: -len('.weight')]}.weight_scale"]
        plain[name] = t.float()
    return convert_flux2_transformer_checkpoint_to_diffusers(plain)


def round_trip_e4m3(w):
    """`--quantize fp8`'s recipe: scale = amax/448, q = e4m3(clamp(w/scale)), back to f32."""
    w = w.float()
    scale = w.abs().max() / 448.0
    return torch.clamp(w / scale, -448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


DOUBLE = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.linear_in",
          "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"}
SINGLE = {"attn.to_qkv_mlp_proj", "attn.to_out"}
TE_LINEARS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
              "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def is_block_linear(name):
    parts = name.split(".", 2)
    if len(parts) < 3 or not name.endswith(".weight"):
        return False
    inner = parts[2][: -len(".weight")]
    return ((parts[0] == "transformer_blocks" and inner in DOUBLE)
            or (parts[0] == "single_transformer_blocks" and inner in SINGLE))


def quantized_tiny_w0():
    """(transformer, text encoder) state dicts of tiny-w0 after `--quantize fp8`."""
    tr = load_file(os.path.join(MODEL, "transformer", "diffusion_pytorch_model.safetensors"))
    tr = {k: round_trip_e4m3(v) if is_block_linear(k) else v.float() for k, v in tr.items()}
    te = load_file(os.path.join(MODEL, "text_encoder", "model.safetensors"))
    te = {k: round_trip_e4m3(v) if k.startswith("model.layers.") and k.endswith(TE_LINEARS)
          else v.float() for k, v in te.items()}
    return tr, te


def write_case(name, transformer_sd, file, lora, scale, quantize, note, text_encoder_sd=None):
    pipe = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.transformer.load_state_dict(transformer_sd)
    if text_encoder_sd is not None:
        missing, unexpected = pipe.text_encoder.load_state_dict(text_encoder_sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    pipe.load_lora_weights(os.path.join(FIX, lora), adapter_name="a0")
    pipe.set_adapters(["a0"], adapter_weights=[scale])
    with torch.no_grad():
        image = pipe(
            prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
            guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]
    out = os.path.join(FIX, "cases", name)
    os.makedirs(out, exist_ok=True)
    image.save(os.path.join(out, "image.png"))
    meta = dict(model="tiny-w0", transformer_file=file, quantize=quantize, dtype="float32",
                prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, guidance=1.0, seed=SEED,
                lora=lora, lora_scale=scale, note=note, image="image.png")
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for f in os.listdir(out):
        os.chmod(os.path.join(out, f), 0o644)
    print(f"wrote {out}")


def main():
    write_case("lora_fp8_bfl_t2i", dequantized_fp8_file(os.path.join(FIX, FP8_FILE)), FP8_FILE,
               "lora/peft.safetensors", 0.8, None,
               "BFL fp8 file, dequantised, + the peft adapter at 0.8")
    tr, te = quantized_tiny_w0()
    write_case("lora_quantize_fp8_t2i", tr, None, "lora/kohya.safetensors", 1.0, "fp8",
               "--quantize fp8 (per tensor E4M3) on tiny-w0 + the kohya adapter at 1.0",
               text_encoder_sd=te)


if __name__ == "__main__":
    main()
