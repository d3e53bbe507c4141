"""LoRA / LoKr fixtures for tests/parity_lora.rs and tests/cli_lora.rs.

Run with the refenv python from the repository root (make_fixtures.sh does):

    ~/.cache/flux2-klein-refenv/bin/python reference/lora_fixtures.py

Writes tests/fixtures/lora/:
  * <name>.safetensors: small adapters for tiny-w0 in each layout diffusers 0.42.1's
    `Flux2LoraLoaderMixin` reads (seeded random factors, large enough to change the image),
    peft_meta written by diffusers' `save_lora_weights` with its peft config in the header;
  * cases.json: per case the adapters and scales, the prompt, size, steps, seed, references,
    and the image file;
  * <case>.png: diffusers' image (`pipe.load_lora_weights(path, adapter_name=…)`, then
    `pipe.set_adapters(names, adapter_weights=scales)`), on the CPU in f32 (one case in bf16),
    4 steps, seed 0;
  * base_t2i.png / base_edit.png / base_t2i_bf16.png: the same runs without adapters (the
    tests check that the adapters change the image).

A fresh pipeline is loaded for every case: LoKr files on BFL names make diffusers fuse the
model's q/k/v projections (`fuse_qkv_projections`), which would leak into later cases.
"""

import json
import os

import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import Flux2KleinPipeline

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "lora")
MODEL = os.path.join(FIX, "models", "tiny-w0")
PROMPT = 'A cat holding a sign that says "Gifu AI Study Group"'
REF = "refs/ref_100x64.png"

# tiny-w0: inner dim 32, MLP hidden 96, 2 double and 2 single blocks, 16 latent channels,
# text width 48, 256 timestep channels.
D, F, IN, TXT, TCH = 32, 96, 16, 48, 256

gen = torch.Generator().manual_seed(1234)


def rand(*shape, std=0.2):
    return torch.randn(*shape, generator=gen) * std


def pair(out_dim, in_dim, rank=4, std=0.2):
    """(lora_A [r, in], lora_B [out, r])."""
    return rand(rank, in_dim, std=std), rand(out_dim, rank, std=std)


def peft_file():
    """diffusers/peft: split q/k/v, every kind of linear (rank 4)."""
    sd = {}
    mods = {}
    for i in range(2):
        b = f"transformer_blocks.{i}"
        for m in ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out"]:
            mods[f"{b}.{m}"] = (D, D)
        for ff in ["ff", "ff_context"]:
            mods[f"{b}.{ff}.linear_in"] = (2 * F, D)
            mods[f"{b}.{ff}.linear_out"] = (D, F)
        s = f"single_transformer_blocks.{i}"
        mods[f"{s}.attn.to_qkv_mlp_proj"] = (3 * D + 2 * F, D)
        mods[f"{s}.attn.to_out"] = (D, D + F)
    mods.update({
        "x_embedder": (D, IN),
        "context_embedder": (D, TXT),
        "time_guidance_embed.timestep_embedder.linear_1": (D, TCH),
        "time_guidance_embed.timestep_embedder.linear_2": (D, D),
        "double_stream_modulation_img.linear": (6 * D, D),
        "double_stream_modulation_txt.linear": (6 * D, D),
        "single_stream_modulation.linear": (3 * D, D),
        "norm_out.linear": (2 * D, D),
        "proj_out": (IN, D),
    })
    for m, (o, i) in mods.items():
        # Smaller deltas where the weights are small or the effect compounds.
        std = 0.1 if "modulation" in m or m == "norm_out.linear" else 0.2
        a, b = pair(o, i, std=std)
        sd[f"transformer.{m}.lora_A.weight"] = a
        sd[f"transformer.{m}.lora_B.weight"] = b
    return sd


def bfl_lora(prefix):
    """ai-toolkit / BFL-PEFT: BFL names, fused qkv (rank 4)."""
    sd = {}
    mods = {}
    for i in range(2):
        for s in ["img", "txt"]:
            mods[f"double_blocks.{i}.{s}_attn.qkv"] = (3 * D, D)
            mods[f"double_blocks.{i}.{s}_attn.proj"] = (D, D)
            mods[f"double_blocks.{i}.{s}_mlp.0"] = (2 * F, D)
            mods[f"double_blocks.{i}.{s}_mlp.2"] = (D, F)
        mods[f"single_blocks.{i}.linear1"] = (3 * D + 2 * F, D)
        mods[f"single_blocks.{i}.linear2"] = (D, D + F)
    mods.update({
        "img_in": (D, IN),
        "txt_in": (D, TXT),
        "time_in.in_layer": (D, TCH),
        "time_in.out_layer": (D, D),
        "double_stream_modulation_img.lin": (6 * D, D),
        "single_stream_modulation.lin": (3 * D, D),
        # Mapped to norm_out.linear as stored (no shift/scale swap), as diffusers does.
        "final_layer.adaLN_modulation.1": (2 * D, D),
        "final_layer.linear": (IN, D),
    })
    for m, (o, i) in mods.items():
        std = 0.1 if "modulation" in m or "adaLN" in m else 0.2
        a, b = pair(o, i, std=std)
        sd[f"{prefix}{m}.lora_A.weight"] = a
        sd[f"{prefix}{m}.lora_B.weight"] = b
    return sd


def kohya_file():
    """kohya/musubi: lora_down/lora_up + alpha ≠ rank, fp16; one fused qkv with a
    block-diagonal lora_up of rank 6 (diffusers' "sparse" split), a text-encoder key (skipped
    with a warning by diffusers)."""
    sd = {}

    def put(stem, o, i, rank=4, alpha=2.0, block_diag=False):
        down, up = pair(o, i, rank=rank, std=0.3)
        if block_diag:
            r3, o3 = rank // 3, o // 3
            mask = torch.zeros(o, rank)
            for j in range(3):
                mask[j * o3:(j + 1) * o3, j * r3:(j + 1) * r3] = 1
            up = up * mask
        sd[f"{stem}.lora_down.weight"] = down.half()
        sd[f"{stem}.lora_up.weight"] = up.half()
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha).half()

    for i in range(2):
        p = f"lora_unet_double_blocks_{i}"
        put(f"{p}_img_attn_qkv", 3 * D, D)
        put(f"{p}_txt_attn_qkv", 3 * D, D, rank=6, alpha=3.0, block_diag=True)
        put(f"{p}_img_attn_proj", D, D, alpha=None)
        put(f"{p}_txt_mlp_0", 2 * F, D)
        put(f"{p}_img_mlp_2", D, F, alpha=8.0)
        put(f"lora_unet_single_blocks_{i}_linear1", 3 * D + 2 * F, D)
        put(f"lora_unet_single_blocks_{i}_linear2", D, D + F)
    put("lora_unet_img_in", D, IN)
    put("lora_unet_final_layer_linear", IN, D)
    put("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 16, 16)
    return sd


def lokr_file():
    """ai-toolkit LoKr on BFL names: fused qkv with lokr_w1 + lokr_w2_a/_b and an alpha (baked
    as alpha/rank), a single-block linear1 with two whole factors (its alpha dropped)."""
    sd = {}
    p = "diffusion_model."
    for i, s in [(0, "img"), (1, "txt")]:
        m = f"{p}double_blocks.{i}.{s}_attn.qkv"
        # [96, 32] = kron([8, 4], [12, 8]); w2 = w2_a [12, 2] @ w2_b [2, 8].
        sd[f"{m}.lokr_w1"] = rand(8, 4, std=0.5)
        sd[f"{m}.lokr_w2_a"] = rand(12, 2, std=0.5)
        sd[f"{m}.lokr_w2_b"] = rand(2, 8, std=0.5)
        sd[f"{m}.alpha"] = torch.tensor(1.0)
    m = f"{p}single_blocks.0.linear1"
    # [288, 32] = kron([16, 4], [18, 8]).
    sd[f"{m}.lokr_w1"] = rand(16, 4, std=0.3)
    sd[f"{m}.lokr_w2"] = rand(18, 8, std=0.3)
    sd[f"{m}.alpha"] = torch.tensor(4.0)
    return sd


def peft_with_metadata(path):
    """diffusers' own `save_lora_weights` with `transformer_lora_adapter_metadata`: the file's
    peft config (lora_alpha 8 with rank 4, so a scale of 2; proj_out rank 2 with alpha 1 through
    rank_pattern / alpha_pattern) is in the safetensors header, and diffusers applies it."""
    layers = {}
    mods = {"transformer_blocks.0.attn.to_q": (D, D), "transformer_blocks.1.ff.linear_in": (2 * F, D),
            "single_transformer_blocks.0.attn.to_out": (D, D + F), "proj_out": (IN, D)}
    for m, (o, i) in mods.items():
        a, b = pair(o, i, rank=2 if m == "proj_out" else 4, std=0.15)
        layers[f"{m}.lora_A.weight"] = a
        layers[f"{m}.lora_B.weight"] = b
    meta = {"r": 4, "lora_alpha": 8, "target_modules": sorted(mods), "rank_pattern": {"proj_out": 2},
            "alpha_pattern": {"proj_out": 1}}
    Flux2KleinPipeline.save_lora_weights(
        OUT, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta,
        weight_name=os.path.basename(path))


FILES = {
    "peft": peft_file,
    "aitoolkit": lambda: bfl_lora("diffusion_model."),
    "bflpeft": lambda: bfl_lora("base_model.model."),
    "kohya": kohya_file,
    "lokr": lokr_file,
    "peft_meta": None,
}

CASES = [
    dict(name="peft_s08", adapters=[("peft", 0.8)]),
    dict(name="aitoolkit", adapters=[("aitoolkit", 1.0)]),
    dict(name="bflpeft_s12", adapters=[("bflpeft", 1.2)]),
    dict(name="kohya", adapters=[("kohya", 1.0)]),
    dict(name="lokr", adapters=[("lokr", 1.0)]),
    dict(name="two_adapters", adapters=[("peft", 0.7), ("aitoolkit", -0.4)]),
    dict(name="edit_peft", adapters=[("peft", 1.0)], ref=REF),
    dict(name="peft_meta_s05", adapters=[("peft_meta", 0.5)]),
    # bf16: peft keeps the adapter in the model's dtype; the tests compare by PSNR.
    dict(name="peft_s08_bf16", adapters=[("peft", 0.8)], dtype="bfloat16"),
]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pipeline(dtype="float32"):
    return Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=DTYPES[dtype])


def generate(pipe, ref):
    kwargs = {}
    if ref is not None:
        kwargs["image"] = Image.open(os.path.join(FIX, ref)).convert("RGB")
    with torch.no_grad():
        return pipe(
            prompt=PROMPT,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(0),
            **kwargs,
        ).images[0]


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, make in FILES.items():
        if make is None:
            peft_with_metadata(os.path.join(OUT, f"{name}.safetensors"))
            continue
        save_file({k: v.contiguous() for k, v in make().items()},
                  os.path.join(OUT, f"{name}.safetensors"))
    generate(pipeline(), None).save(os.path.join(OUT, "base_t2i.png"))
    generate(pipeline(), REF).save(os.path.join(OUT, "base_edit.png"))
    generate(pipeline("bfloat16"), None).save(os.path.join(OUT, "base_t2i_bf16.png"))
    records = []
    for case in CASES:
        dtype = case.get("dtype", "float32")
        pipe = pipeline(dtype)
        names = []
        for k, (file, _) in enumerate(case["adapters"]):
            name = f"a{k}_{file}"
            pipe.load_lora_weights(os.path.join(OUT, f"{file}.safetensors"), adapter_name=name)
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[s for _, s in case["adapters"]])
        image = generate(pipe, case.get("ref"))
        image.save(os.path.join(OUT, f"{case['name']}.png"))
        records.append({
            "name": case["name"],
            "adapters": [{"file": f"{f}.safetensors", "scale": s} for f, s in case["adapters"]],
            "prompt": PROMPT,
            "size": [64, 64],
            "steps": 4,
            "seed": 0,
            "ref": case.get("ref"),
            "dtype": dtype,
            "image": f"{case['name']}.png",
            "base": ("base_edit.png" if case.get("ref") else "base_t2i.png").replace(
                ".png", "_bf16.png" if dtype == "bfloat16" else ".png"),
        })
        print(f"wrote {case['name']}")
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"model": "tiny-w0", "cases": records}, f, indent=1)


main()
