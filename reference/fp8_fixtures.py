"""Single-file transformer and fp8 fixtures for tests/parity_fp8.rs and tests/cli_fp8.rs.

Run with the refenv python from the repository root (make_fixtures.sh does):

    ~/.cache/flux2-klein-refenv/bin/python reference/fp8_fixtures.py

Writes tests/fixtures/fp8/:
  * tiny-w0-fp8-bfl.safetensors: the tiny-w0 transformer in the layout of BFL's
    `flux-2-klein-4b-fp8.safetensors` (spec-wave2 §2.2): BFL names, the block linears (qkv,
    proj, mlp.0, mlp.2 of both streams; linear1, linear2) as F8_E4M3 with F32 scalar
    `weight_scale` (= amax/448) and `input_scale` (= the layer input's amax/448 on the case
    below), everything else BF16, and the header's `_quantization_metadata` listing the
    quantised stems;
  * tiny-w0-fp8-comfyquant.safetensors: the same tensors with ComfyUI's per-layer
    `<stem>.comfy_quant` records instead of the header;
  * tiny-w0-e5m2-scaled.safetensors: ComfyUI's legacy scaled fp8 (`scaled_fp8` marker,
    `<stem>.scale_weight` / `.scale_input`, `model.diffusion_model.` prefix), F8_E5M2 with
    scale = amax/57344;
  * tiny-w1-bf16-bfl.safetensors: another random transformer of the tiny config (weights seed
    1), BFL names, bf16;
  * tiny-w2-diffusers.safetensors: a third one (weights seed 2), diffusers names, f16;
  * fp8_codes.json: f32 values and the codes torch's casts give them (after the clamp to
    ±max that ComfyUI applies), for both formats.
and, per case, tests/fixtures/cases/<case>/{case.json,image.png}: diffusers 0.42.1
`Flux2KleinPipeline` on tiny-w0 (text encoder, VAE, scheduler) with the transformer's weights
replaced by the file's, dequantised as `f32(q) · weight_scale` (how the fp8 files are meant to
be read; diffusers' own single-file loader cannot read them, spec-wave2 §2.4), f32, 64×64,
4 steps, seed 0. The `quantize_fp8` case is `--quantize fp8`: every transformer block linear
and text-encoder linear of tiny-w0 quantised per tensor (amax/448, E4M3) and back.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "refcheck"))

from bfl_fixture import to_bfl  # noqa: E402
from tiny_models import QK_SCALE, _randomize_  # noqa: E402

# The refenv's peft (0.17.1, installed for the LoRA fixtures) imports a name transformers 5.24
# no longer has; these fixtures need no peft, so diffusers is told it is absent.
import diffusers.utils as _diffusers_utils  # noqa: E402
import diffusers.utils.import_utils as _import_utils  # noqa: E402

_import_utils._peft_available = False
_diffusers_utils.USE_PEFT_BACKEND = False
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux2_transformer_checkpoint_to_diffusers,
)

torch.set_num_threads(1)
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "fp8")
MODEL = os.path.join(FIX, "models", "tiny-w0")
PROMPT = 'A cat holding a sign that says "Gifu AI Study Group"'
SIZE = 64
STEPS = 4
SEED = 0

FP8 = {
    "float8_e4m3fn": (torch.float8_e4m3fn, 448.0),
    "float8_e5m2": (torch.float8_e5m2, 57344.0),
}


def is_block_linear(bfl_name):
    """The 80 layers BFL's klein-4B fp8 file stores as fp8 (spec-wave2 §2.2)."""
    parts = bfl_name.split(".")
    if parts[0] == "double_blocks":
        return ".".join(parts[2:4]) in ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv",
                                          "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                                          "txt_mlp.0", "txt_mlp.2") and parts[-1] == "weight"
    if parts[0] == "single_blocks":
        return parts[2] in ("linear1", "linear2") and parts[-1] == "weight"
    return False


def quantize(w, fmt):
    """ComfyUI's (and BFL's) per-tensor recipe: scale = amax/max, q = fp8(clamp(w/scale))."""
    dtype, fmax = FP8[fmt]
    w = w.float()
    scale = w.abs().max() / fmax
    q = torch.clamp(w / scale, -fmax, fmax).to(dtype)
    return q, scale.reshape(())


def dequantize(q, scale):
    return q.to(torch.float32) * scale


def diffusers_transformer_sd():
    return {k: v.float() for k, v in
            load_file(os.path.join(MODEL, "transformer", "diffusion_pytorch_model.safetensors")).items()}


def random_transformer_sd(seed):
    """Another transformer of the tiny config, randomised as tiny_models does (weights seed)."""
    cfg = json.load(open(os.path.join(MODEL, "transformer", "config.json")))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    model = Flux2Transformer2DModel(**cfg).float().eval()
    _randomize_(model, torch.Generator("cpu").manual_seed(seed * 1000 + 2), qk_scale=QK_SCALE)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def input_amax(sd):
    """The largest |input| of every block linear on the case's run (for `input_scale`), by
    BFL stem."""
    pipe = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.transformer.load_state_dict(sd)
    amax = {}
    names = {
        "attn.to_q": "img_attn.qkv", "attn.add_q_proj": "txt_attn.qkv",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
        "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
    }
    hooks = []
    for name, mod in pipe.transformer.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] not in ("transformer_blocks", "single_transformer_blocks"):
            continue
        inner = ".".join(parts[2:])
        if inner not in names:
            continue
        block = "double_blocks" if parts[0] == "transformer_blocks" else "single_blocks"
        stem = f"{block}.{parts[1]}.{names[inner]}"

        def hook(m, args, stem=stem):
            amax[stem] = max(amax.get(stem, 0.0), float(args[0].abs().max()))

        hooks.append(mod.register_forward_pre_hook(hook))
    run(pipe)
    for h in hooks:
        h.remove()
    return amax


def fp8_bfl_file(sd, fmt="float8_e4m3fn"):
    """(tensors, quantised stems) in the official layout: fp8 block linears + F32 scalar
    scales, everything else bf16."""
    amax = input_amax(sd)
    bfl = to_bfl(sd)
    out, stems = {}, []
    for name, t in sorted(bfl.items()):
        if is_block_linear(name):
            stem = name[: -len(".weight")]
            q, scale = quantize(t, fmt)
            out[name] = q
            out[f"{stem}.weight_scale"] = scale.float()
            out[f"{stem}.input_scale"] = torch.tensor(amax[stem] / FP8[fmt][1], dtype=torch.float32)
            stems.append(stem)
        else:
            out[name] = t.to(torch.bfloat16)
    return out, stems


def dequantized_diffusers_sd(bfl_tensors, weight_scale="weight_scale", prefix=""):
    """The diffusers state dict the file means: fp8 weights times their scale, in f32."""
    plain = {}
    for name, t in bfl_tensors.items():
        name = name[len(prefix):] if name.startswith(prefix) else name
        if name.endswith((".weight_scale", ".input_scale", ".scale_weight", ".scale_input",
                          ".comfy_quant")) or name == "scaled_fp8":
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = dequantize(t, bfl_tensors[f"{prefix}{name[: -len('.weight')]}.{weight_scale}"])
        plain[name] = t.float()
    return convert_flux2_transformer_checkpoint_to_diffusers(plain)


def run(pipe):
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]


def write_case(name, transformer_sd, file, note, text_encoder_sd=None):
    pipe = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.transformer.load_state_dict(transformer_sd)
    if text_encoder_sd is not None:
        missing, unexpected = pipe.text_encoder.load_state_dict(text_encoder_sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    image = run(pipe)
    out = os.path.join(FIX, "cases", name)
    os.makedirs(out, exist_ok=True)
    image.save(os.path.join(out, "image.png"))
    meta = dict(model="tiny-w0", transformer_file=file, dtype="float32", prompt=PROMPT,
                width=SIZE, height=SIZE, steps=STEPS, guidance=1.0, seed=SEED, note=note,
                image="image.png")
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out}")


def codes_table():
    vals = [0.0, -0.0, 1.0, -1.0, 0.1, -0.3, 3.14159, 447.9, 448.0, 449.0, 464.0, 470.0, 1e6,
            -1e6, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -7 * 1.0625, 57344.0,
            61440.0, 1e-5, 2.0 ** -16, 2.0 ** -17, 3 * 2.0 ** -18, 1.125, 1.0625, 1.1875, 240.0,
            248.0, 232.0, -0.0009765625]
    g = torch.Generator().manual_seed(5)
    vals += (torch.randn(200, generator=g) * 30).tolist()
    vals += (torch.randn(100, generator=g) * 0.01).tolist()
    x = torch.tensor(vals, dtype=torch.float32)
    table = {"values": [float(v) for v in x]}
    for fmt, (dtype, fmax) in FP8.items():
        q = torch.clamp(x, -fmax, fmax).to(dtype)
        table[fmt] = [int(b) for b in q.view(torch.uint8)]
        table[fmt + "_decoded"] = [float(v) for v in q.float()]
    with open(os.path.join(OUT, "fp8_codes.json"), "w") as f:
        json.dump(table, f)


def main():
    os.makedirs(OUT, exist_ok=True)
    codes_table()
    w0 = diffusers_transformer_sd()

    # 1. BFL's fp8 layout.
    tensors, stems = fp8_bfl_file(w0)
    qmeta = json.dumps({"layers": {s: {"format": "float8_e4m3fn"} for s in stems}})
    save_file(tensors, os.path.join(OUT, "tiny-w0-fp8-bfl.safetensors"),
              metadata={"_quantization_metadata": qmeta})
    write_case("fp8_bfl_t2i", dequantized_diffusers_sd(tensors), "fp8/tiny-w0-fp8-bfl.safetensors",
               "BFL fp8 layout (E4M3, scalar weight_scale = amax/448)")

    # 2. The same bytes with ComfyUI's per-layer records.
    comfy = dict(tensors)
    for s in stems:
        rec = json.dumps({"format": "float8_e4m3fn"}).encode()
        comfy[f"{s}.comfy_quant"] = torch.tensor(list(rec), dtype=torch.uint8)
    save_file(comfy, os.path.join(OUT, "tiny-w0-fp8-comfyquant.safetensors"))

    # 3. Legacy scaled fp8, E5M2, prefixed.
    e5, _ = fp8_bfl_file(w0, "float8_e5m2")
    pre = "model.diffusion_model."
    scaled = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, t in e5.items():
        name = name.replace(".weight_scale", ".scale_weight").replace(".input_scale", ".scale_input")
        scaled[pre + name] = t
    save_file(scaled, os.path.join(OUT, "tiny-w0-e5m2-scaled.safetensors"))
    write_case("fp8_e5m2_scaled_t2i", dequantized_diffusers_sd(scaled, "scale_weight", pre),
               "fp8/tiny-w0-e5m2-scaled.safetensors",
               "ComfyUI scaled fp8 (E5M2, scale_weight = amax/57344, model.diffusion_model. prefix)")

    # 4. A bf16 BFL single file (another transformer).
    w1 = {k: v.to(torch.bfloat16) for k, v in to_bfl(random_transformer_sd(1)).items()}
    save_file(w1, os.path.join(OUT, "tiny-w1-bf16-bfl.safetensors"))
    back = convert_flux2_transformer_checkpoint_to_diffusers({k: v.float() for k, v in w1.items()})
    write_case("bf16_bfl_t2i", back, "fp8/tiny-w1-bf16-bfl.safetensors", "BFL names, bf16")

    # 5. A diffusers-named single file, f32 (a third transformer).
    w2 = random_transformer_sd(2)
    save_file({k: v.to(torch.float16).contiguous() for k, v in w2.items()},
              os.path.join(OUT, "tiny-w2-diffusers.safetensors"))
    w2 = {k: v.to(torch.float16).float() for k, v in w2.items()}
    write_case("diffusers_single_t2i", w2, "fp8/tiny-w2-diffusers.safetensors",
               "diffusers names, f16")

    # 6. --quantize fp8 on tiny-w0: block linears and text-encoder linears, per tensor.
    def round_trip(sd, select):
        return {k: (dequantize(*quantize(v, "float8_e4m3fn")) if select(k) else v.float())
                for k, v in sd.items()}

    double = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.linear_in",
              "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"}
    single = {"attn.to_qkv_mlp_proj", "attn.to_out"}

    def is_block_linear_diffusers(k):
        parts = k.split(".", 2)
        if len(parts) < 3 or not k.endswith(".weight"):
            return False
        inner = parts[2][: -len(".weight")]
        return ((parts[0] == "transformer_blocks" and inner in double)
                or (parts[0] == "single_transformer_blocks" and inner in single))

    tq = round_trip(w0, is_block_linear_diffusers)
    te = load_file(os.path.join(MODEL, "text_encoder", "model.safetensors"))
    lin = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
           "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    teq = round_trip(te, lambda k: k.startswith("model.layers.") and k.endswith(lin))
    write_case("quantize_fp8_t2i", tq, None, "--quantize fp8 (per tensor E4M3) on tiny-w0",
               text_encoder_sd=teq)

    for dirpath, _, files in os.walk(OUT):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


if __name__ == "__main__":
    main()
