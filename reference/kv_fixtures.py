"""KV-cache checkpoint fixtures for tests/parity_kv.rs.

Run with the refenv python from the repository root (make_fixtures.sh does, after it has made
tests/fixtures/models/tiny-kv-w0: the tiny-w0 components with `_class_name`
`Flux2KleinKVPipeline` in model_index.json):

    ~/.cache/flux2-klein-refenv/bin/python reference/kv_fixtures.py

diffusers 0.42.1 `Flux2KleinKVPipeline` on the CPU, 4 steps, the Gifu prompt, seed 0
(`torch.Generator("cpu")`). Each case writes tests/fixtures/cases/<name>/:
  * ref_<k>.png (the references), image.png (the pipeline's output);
  * case.json: the settings, the randn calls, the output size;
  * tensors.safetensors: the noise, the packed reference tokens and their ids as the
    transformer received them at step 0 (`image_latents`, `image_latent_ids`), the latents
    after every step, and the reference K/V the step-0 `extract` call cached for every block
    (`kv.double.<i>.k`, `kv.double.<i>.v`, `kv.single.<i>.k`, `kv.single.<i>.v`; diffusers'
    layout `(B, N_ref, H, D)`, post-RoPE).
"""

import json
import os

import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.utils
import diffusers.utils.import_utils as import_utils

# The refenv's peft does not import under transformers 5.24 (`HybridCache` is gone), and
# diffusers imports it when it is installed (the LoRA mixin, the transformer's LoRA-scale
# wrapper); no LoRA runs here, so diffusers is told peft is absent (numerics unchanged).
import_utils._peft_available = False
diffusers.utils.USE_PEFT_BACKEND = False
import diffusers.pipelines.flux2.pipeline_flux2_klein_kv as kv_mod  # noqa: E402
from diffusers import Flux2KleinKVPipeline  # noqa: E402

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
PROMPT = 'A cat holding a sign that says "Gifu AI Study Group"'
MODEL = "tiny-kv-w0"

CASES = [
    # One reference, no size: the output takes the reference's floored size (96x64).
    dict(name="kv_ref1_default_size", dtype="float32", refs=["refs/ref_100x64.png"]),
    # Two references of different sizes, 64x64 output.
    dict(name="kv_refs2_64x64", dtype="float32", size=(64, 64),
         refs=["refs/ref_72x88.png", "refs/ref_100x64.png"]),
    # The one-reference case in bfloat16.
    dict(name="kv_ref1_default_size_bf16", dtype="bfloat16", refs=["refs/ref_100x64.png"]),
    # Text only on a KV model: diffusers' standard forward (no cache).
    dict(name="kv_t2i_64x64", dtype="float32", size=(64, 64), refs=[]),
]


def run(case, pipes):
    out = os.path.join(FIX, "cases", case["name"])
    os.makedirs(out, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case["dtype"]]
    if case["dtype"] not in pipes:
        pipes[case["dtype"]] = Flux2KleinKVPipeline.from_pretrained(
            os.path.join(FIX, "models", MODEL), torch_dtype=dtype
        )
    pipe = pipes[case["dtype"]]
    refs = []
    names = []
    for k, r in enumerate(case["refs"]):
        ref = Image.open(os.path.join(FIX, r)).convert("RGB")
        ref.save(os.path.join(out, f"ref_{k}.png"))
        refs.append(ref)
        names.append(f"ref_{k}.png")
    kwargs = {}
    if refs:
        kwargs["image"] = refs
    if case.get("size"):
        kwargs["width"], kwargs["height"] = case["size"]

    tensors = {}
    randn_calls = []
    orig_randn = kv_mod.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        x = orig_randn(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        randn_calls.append({"shape": list(shape), "dtype": str(dtype)})
        tensors["noise"] = x
        return x

    extract_calls = []

    def hook(module, args, kwargs, output):
        # The step-0 extract call returns (noise_pred, kv_cache); record the inputs it was
        # given and every block's cached reference K/V (the tensors, before `clear`).
        if kwargs.get("kv_cache_mode") == "extract":
            extract_calls.append(1)
            n_ref = kwargs["num_ref_tokens"]
            tensors["image_latents"] = kwargs["hidden_states"][:, :n_ref]
            tensors["image_latent_ids"] = kwargs["img_ids"][:, :n_ref]
            cache = output[1]
            for i, c in enumerate(cache.double_block_caches):
                tensors[f"kv.double.{i}.k"] = c.k_ref
                tensors[f"kv.double.{i}.v"] = c.v_ref
            for i, c in enumerate(cache.single_block_caches):
                tensors[f"kv.single.{i}.k"] = c.k_ref
                tensors[f"kv.single.{i}.v"] = c.v_ref
        return output

    def on_step(p, i, t, kw):
        tensors[f"step.{i}.latents"] = kw["latents"]
        return {}

    kv_mod.randn_tensor = randn_tensor
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            image = pipe(
                prompt=PROMPT,
                num_inference_steps=4,
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=on_step,
                **kwargs,
            ).images[0]
    finally:
        kv_mod.randn_tensor = orig_randn
        handle.remove()
    assert len(extract_calls) == (1 if refs else 0)
    image.save(os.path.join(out, "image.png"))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out, "tensors.safetensors"))
    meta = {
        "model": MODEL,
        "dtype": case["dtype"],
        "prompt": PROMPT,
        "steps": 4,
        "seed": 0,
        "size": list(case["size"]) if case.get("size") else None,
        "refs": names,
        "image": "image.png",
        "image_size": list(image.size),
        "randn_calls": randn_calls,
        "double_blocks": len(pipe.transformer.transformer_blocks),
        "single_blocks": len(pipe.transformer.single_transformer_blocks),
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out}: {image.size}")


pipes = {}
for c in CASES:
    run(c, pipes)
