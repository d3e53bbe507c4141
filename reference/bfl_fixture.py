"""Transformer fixtures, in tests/fixtures/transformer/:

1. `tiny-w0-bfl.safetensors`: the tiny-w0 transformer under the original Black Forest Labs
   single-file names (as in `flux-2-klein-4b.safetensors`).
2. `tiny-guidance/`: a tiny `Flux2Transformer2DModel` with `guidance_embeds=True` (the
   FLUX.2 [dev]-style guidance embedder, absent from klein) saved by diffusers
   (`config.json`, `diffusion_pytorch_model.safetensors`, f32) and `io.safetensors` with
   random inputs and the diffusers outputs with and without a guidance value.

The map is the inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`
(loaders/single_file_utils.py, same as scripts/convert_flux2_to_diffusers.py), written here by
hand: q/k/v of each double-block stream are concatenated along rows into `qkv`, the final
adaLN modulation gets its (scale, shift) halves swapped back to BFL's (shift, scale), and the
RMSNorm weights are called `scale`. As a check, the result is converted back with diffusers'
own converter and must give the original tensors bit for bit.

    ~/.cache/flux2-klein-refenv/bin/python reference/bfl_fixture.py
"""

import os
import re
import sys

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "tests/fixtures/models/tiny-w0/transformer/diffusion_pytorch_model.safetensors")
OUT_DIR = os.path.join(ROOT, "tests/fixtures/transformer")
OUT = os.path.join(OUT_DIR, "tiny-w0-bfl.safetensors")

TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}


def param_name(bfl_module, param):
    return "scale" if "_norm" in bfl_module and param == "weight" else param


def to_bfl(sd):
    out = {}
    used = set()
    for name, t in sd.items():
        module, param = name.rsplit(".", 1)
        if module == "norm_out.linear":
            scale, shift = t.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale], dim=0)
            used.add(name)
        elif module in TOP:
            out[f"{TOP[module]}.{param}"] = t
            used.add(name)
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            i, inner = m.groups()
            if inner in DOUBLE:
                bfl = DOUBLE[inner]
                out[f"double_blocks.{i}.{bfl}.{param_name(bfl, param)}"] = t
                used.add(name)
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            i, inner = m.groups()
            if inner in SINGLE:
                bfl = SINGLE[inner]
                out[f"single_blocks.{i}.{bfl}.{param_name(bfl, param)}"] = t
                used.add(name)
    # Fused q/k/v.
    blocks = sorted({int(m.group(1)) for n in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", n))})
    for i in blocks:
        for fused, parts in QKV.items():
            for param in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{p}.{param}" for p in parts]
                if all(n in sd for n in names):
                    out[f"double_blocks.{i}.{fused}.{param}"] = torch.cat([sd[n] for n in names], dim=0)
                    used.update(names)
    missing = sorted(set(sd) - used)
    if missing:
        sys.exit(f"no BFL name for: {missing}")
    return out


def main():
    sd = load_file(SRC)
    bfl = to_bfl(sd)
    # Round trip through diffusers' own converter.
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    back = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert set(back) == set(sd), (sorted(set(back) ^ set(sd)))
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    os.makedirs(OUT_DIR, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(bfl.items())}, OUT)
    print(f"wrote {OUT}: {len(bfl)} tensors (from {len(sd)} diffusers tensors), round trip exact")


def guidance_fixture():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(3.0 * (1.0 + 0.2 * torch.randn_like(p)))
    out_dir = os.path.join(OUT_DIR, "tiny-guidance")
    model.save_pretrained(out_dir, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    n, l = 12, 8
    img_ids = torch.tensor([[0, h, w, 0] for h in range(3) for w in range(4)], dtype=torch.int64)[None]
    txt_ids = torch.tensor([[0, 0, 0, i] for i in range(l)], dtype=torch.int64)[None]
    io = {
        "hidden_states": torch.randn(1, n, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, l, 24, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([4.0]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }
    with torch.no_grad():
        args = {k: io[k] for k in ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")}
        io["output"] = model(**args, guidance=io["guidance"], return_dict=False)[0]
        io["output_no_guidance"] = model(**args, guidance=None, return_dict=False)[0]
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out_dir, "io.safetensors"))
    print(f"wrote {out_dir}: guidance changes the output by "
          f"{(io['output'] - io['output_no_guidance']).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
    guidance_fixture()
    for dirpath, _, files in os.walk(OUT_DIR):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
