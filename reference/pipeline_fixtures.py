"""Pipeline-level fixtures beyond the refcheck cases, for tests/cli_generate.rs.

Run with the refenv python from the repository root (make_fixtures.sh does):

    ~/.cache/flux2-klein-refenv/bin/python reference/pipeline_fixtures.py

Writes tests/fixtures/pipeline/:
  * negative_prompt.png: Flux2KleinPipeline on tests/fixtures/models/tiny-base-w0 (CFG model),
    float32 on the CPU, the Gifu prompt, guidance 4, 4 steps, 64x64, seed 0
    (torch.Generator("cpu")), with `negative_prompt_embeds` = the pipeline's own
    `encode_prompt("blurry, low quality")` (diffusers' way to use a negative prompt: its
    `__call__` always encodes "" otherwise);
  * manifest.json: the settings.
"""

import json
import os

import torch
from diffusers import Flux2KleinPipeline

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "pipeline")
MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-base-w0")
os.makedirs(OUT, exist_ok=True)

case = {
    "model": "tiny-base-w0",
    "prompt": 'A cat holding a sign that says "Gifu AI Study Group"',
    "negative_prompt": "blurry, low quality",
    "guidance": 4.0,
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 0,
    "image": "negative_prompt.png",
}
pipe = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
assert not pipe.config.is_distilled
with torch.no_grad():
    negative, _ = pipe.encode_prompt(prompt=case["negative_prompt"], device="cpu")
    image = pipe(
        prompt=case["prompt"],
        negative_prompt_embeds=negative,
        guidance_scale=case["guidance"],
        num_inference_steps=case["steps"],
        height=case["height"],
        width=case["width"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
    ).images[0]
image.save(os.path.join(OUT, case["image"]))
with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump({"negative_prompt": case}, f, indent=1)
print(f"wrote {OUT}")
