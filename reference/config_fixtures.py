"""The FLUX.2 [klein] 9B-KV configs, without weights, for tests/parity_kv.rs.

Run with the refenv python from the repository root (make_fixtures.sh does):

    ~/.cache/flux2-klein-refenv/bin/python reference/config_fixtures.py

Writes tests/fixtures/configs/klein-9b-kv/, a diffusers-layout model directory with every
config and no weights:
  * model_index.json: `_class_name` Flux2KleinKVPipeline (as black-forest-labs/FLUX.2-klein-9b-kv);
  * transformer/config.json: diffusers' `Flux2Transformer2DModel` with the 9B values of
    diffusers' scripts/convert_flux2_to_diffusers.py (8 double + 24 single blocks, 32 heads
    of 128, joint_attention_dim 12288; the rest as klein 4B), saved by diffusers;
  * text_encoder/config.json: Qwen3-8B (hidden 4096, 36 layers, intermediate 12288, 32 heads,
    8 KV heads, head_dim 128, untied embeddings), saved by transformers;
  * vae/config.json: `AutoencoderKLFlux2` with its defaults (the klein VAE, spec-wave2 §6);
  * scheduler/: tiny-w0's (the klein scheduler config); tokenizer: a link to the one copy;
  * parameter_counts.json: the parameters of each model as diffusers and transformers build
    them from these configs (on the meta device: no memory).
"""

import json
import os
import shutil

import torch
import diffusers.utils
import diffusers.utils.import_utils as import_utils

# As in kv_fixtures.py: the refenv's peft does not import under transformers 5.24.
import_utils._peft_available = False
diffusers.utils.USE_PEFT_BACKEND = False
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "configs", "klein-9b-kv")

TRANSFORMER_9B = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=24,
    attention_head_dim=128, num_attention_heads=32, joint_attention_dim=12288,
    timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
    max_window_layers=36, bos_token_id=151643, eos_token_id=151645,
)


def count(model):
    return sum(p.numel() for p in model.parameters())


shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)
with torch.device("meta"):
    transformer = Flux2Transformer2DModel(**TRANSFORMER_9B)
    vae = AutoencoderKLFlux2()
    text_config = Qwen3Config(**QWEN3_8B)
    text_encoder = Qwen3ForCausalLM(text_config)
transformer.save_config(os.path.join(OUT, "transformer"))
vae.save_config(os.path.join(OUT, "vae"))
text_config.save_pretrained(os.path.join(OUT, "text_encoder"))
shutil.copytree(os.path.join(FIX, "models", "tiny-w0", "scheduler"), os.path.join(OUT, "scheduler"))
os.symlink("../../tokenizer", os.path.join(OUT, "tokenizer"))
index = json.load(open(os.path.join(FIX, "models", "tiny-w0", "model_index.json")))
index["_class_name"] = "Flux2KleinKVPipeline"
with open(os.path.join(OUT, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)
counts = {
    "transformer": count(transformer),
    "text_encoder": count(text_encoder),
    "vae": count(vae),
}
with open(os.path.join(OUT, "parameter_counts.json"), "w") as f:
    json.dump(counts, f, indent=1)
print(f"wrote {OUT}: {counts}")
