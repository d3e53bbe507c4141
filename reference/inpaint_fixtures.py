"""Inpainting and image-to-image fixtures for tests/parity_inpaint.rs and tests/cli_inpaint.rs.

Run with the refenv python from the repository root (make_fixtures.sh does):

    ~/.cache/flux2-klein-refenv/bin/python reference/inpaint_fixtures.py

diffusers 0.42.1 `Flux2KleinInpaintPipeline` on the tiny models in tests/fixtures/models, on the
CPU, 4 steps, the Gifu prompt, seed 0 (`torch.Generator("cpu")`). Each case writes
tests/fixtures/cases/<name>/:
  * init.png (the init image), mask.png (when the case has one), ref_0.png (reference);
  * image.png: the pipeline's output;
  * case.json: the settings, the randn calls (shape, dtype) in the order the pipeline drew them,
    the timesteps that ran;
  * tensors.safetensors: the noise, the packed init latents, the packed mask, the initial
    latents and the latents after every step (for diagnosing a mismatch).

Image-to-image is diffusers' inpaint pipeline with an all-white mask (`mask_image` is required
there), which is what `generate --init-image` without `--mask` runs.
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint as inpaint_mod
from diffusers import Flux2KleinInpaintPipeline

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
PROMPT = 'A cat holding a sign that says "Gifu AI Study Group"'


def pattern(width, height, seed):
    """A smooth, deterministic RGB picture (gradients and a disc), so the VAE sees structure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    r = 127.5 + 127.5 * np.sin(a * x / width * np.pi + b)
    g = 255.0 * y / max(height - 1, 1)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2) < (min(width, height) * 0.25) ** 2
    bl = np.where(disc, 230.0, 40.0 + 60.0 * np.cos(c * (x + y) / width))
    rgb = np.stack([r, g, bl], axis=-1).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def box_mask(width, height, box):
    """White (repaint) inside `box` = (x0, y0, x1, y1), black elsewhere, saved as RGB."""
    m = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m, "RGB")


CASES = [
    # A half mask (the right half repainted) at strength 0.7: 4 steps run the last 3.
    dict(name="inpaint_half_s07", model="tiny-w0", dtype="float32", size=(64, 64),
         mask=("box", (32, 0, 64, 64)), strength=0.7),
    # A box mask with one reference at strength 1.0 (pure noise in the box, all 4 steps).
    dict(name="inpaint_box_ref_s10", model="tiny-w0", dtype="float32", size=(64, 64),
         mask=("box", (16, 16, 48, 40)), strength=1.0, ref="refs/ref_100x64.png"),
    # Image-to-image (all-white mask) at strength 0.5 on the second tiny model; the init image
    # is 72x136, so the output is 64x128 and the init image is LANCZOS-resized to it.
    dict(name="i2i_s05", model="tiny2-w0", dtype="float32", size=(72, 136),
         mask=None, strength=0.5),
    # padding_mask_crop: the crop around a small box is inpainted at 64x64 and pasted back.
    dict(name="inpaint_crop_s08", model="tiny-w0", dtype="float32", size=(64, 64),
         mask=("box", (36, 8, 52, 24)), strength=0.8, padding_mask_crop=8),
    # Two references of different sizes: diffusers takes a list, so both are centre-cropped
    # to the first one's floored size (96x64; the 72x88 one gets black sides).
    dict(name="inpaint_two_refs_s09", model="tiny-w0", dtype="float32", size=(64, 64),
         mask=("box", (8, 24, 56, 56)), strength=0.9,
         refs=["refs/ref_100x64.png", "refs/ref_72x88.png"]),
    # A base (CFG) model: guidance 4 with the empty negative prompt, as diffusers.
    dict(name="inpaint_base_cfg4_s07", model="tiny-base-w0", dtype="float32", size=(64, 64),
         mask=("box", (0, 0, 40, 64)), strength=0.7, guidance=4.0),
    # The half-mask case in bfloat16.
    dict(name="inpaint_half_s07_bf16", model="tiny-w0", dtype="bfloat16", size=(64, 64),
         mask=("box", (32, 0, 64, 64)), strength=0.7),
]


def run(case, pipes):
    out = os.path.join(FIX, "cases", case["name"])
    os.makedirs(out, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case["dtype"]]
    key = (case["model"], case["dtype"])
    if key not in pipes:
        pipes[key] = Flux2KleinInpaintPipeline.from_pretrained(
            os.path.join(FIX, "models", case["model"]), torch_dtype=dtype
        )
    pipe = pipes[key]
    width, height = case["size"]
    init = pattern(width, height, seed=len(case["name"]))
    init.save(os.path.join(out, "init.png"))
    if case["mask"] is not None:
        mask = box_mask(width, height, case["mask"][1])
        mask.save(os.path.join(out, "mask.png"))
    else:
        mask = Image.new("RGB", (width, height), (255, 255, 255))
    kwargs = {}
    refs = []
    if case.get("ref"):
        ref = Image.open(os.path.join(FIX, case["ref"])).convert("RGB")
        ref.save(os.path.join(out, "ref_0.png"))
        kwargs["image_reference"] = ref
        refs = ["ref_0.png"]
    for k, r in enumerate(case.get("refs", [])):
        ref = Image.open(os.path.join(FIX, r)).convert("RGB")
        ref.save(os.path.join(out, f"ref_{k}.png"))
        kwargs.setdefault("image_reference", []).append(ref)
        refs.append(f"ref_{k}.png")
    if case.get("padding_mask_crop") is not None:
        kwargs["padding_mask_crop"] = case["padding_mask_crop"]

    tensors = {}
    randn_calls = []
    orig_randn = inpaint_mod.randn_tensor

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        x = orig_randn(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        randn_calls.append({"shape": list(shape), "dtype": str(dtype)})
        tensors["noise"] = x
        return x

    inpaint_mod.randn_tensor = randn_tensor
    orig_prepare_latents = pipe.prepare_latents
    orig_prepare_mask = pipe.prepare_mask_latents

    def prepare_latents(*a, **kw):
        lat, noise, packed, encoded, ids = orig_prepare_latents(*a, **kw)
        tensors["latents.init"] = lat
        tensors["init_latents"] = packed
        return lat, noise, packed, encoded, ids

    def prepare_mask_latents(*a, **kw):
        m = orig_prepare_mask(*a, **kw)
        tensors["mask"] = m
        return m

    def on_step(p, i, t, kw):
        tensors[f"step.{i}.latents"] = kw["latents"]
        return {}

    pipe.prepare_latents = prepare_latents
    pipe.prepare_mask_latents = prepare_mask_latents
    try:
        with torch.no_grad():
            image = pipe(
                prompt=PROMPT,
                image=init,
                mask_image=mask,
                strength=case["strength"],
                num_inference_steps=4,
                guidance_scale=case.get("guidance", 1.0),
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=on_step,
                **kwargs,
            ).images[0]
        timesteps = [float(t) for t in pipe.scheduler.timesteps[-pipe._num_timesteps:]]
    finally:
        inpaint_mod.randn_tensor = orig_randn
        pipe.prepare_latents = orig_prepare_latents
        pipe.prepare_mask_latents = orig_prepare_mask
    image.save(os.path.join(out, "image.png"))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out, "tensors.safetensors"))
    meta = {
        "model": case["model"],
        "dtype": case["dtype"],
        "prompt": PROMPT,
        "steps": 4,
        "guidance": case.get("guidance", 1.0),
        "seed": 0,
        "strength": case["strength"],
        "padding_mask_crop": case.get("padding_mask_crop"),
        "init_image": "init.png",
        "init_size": [width, height],
        "mask": "mask.png" if case["mask"] is not None else None,
        "mask_box": case["mask"][1] if case["mask"] is not None else None,
        "refs": refs,
        "image": "image.png",
        "image_size": list(image.size),
        "timesteps_run": timesteps,
        "randn_calls": randn_calls,
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out}: {image.size}, {len(timesteps)} steps")


pipes = {}
for c in CASES:
    run(c, pipes)


# ---- Preprocessing only (no model): tests/fixtures/cases/inpaint_masks/ ------------------------
# The init image and mask preprocessing of `__call__` step 2 (`get_crop_region`, `preprocess`
# with resize_mode "default" or "fill") and `prepare_mask_latents`, on masks of another size,
# grey masks and crops that leave bars for `_resize_and_fill` to fill. Writes per item the
# inputs, `<name>.pixels.png` (the preprocessed init image before normalising, which
# `preprocess` turns into exactly `2·x/255 − 1`) and, in masks.json, the crop and the packed
# mask values.
from types import SimpleNamespace

from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor


def preprocessing_fixtures():
    out = os.path.join(FIX, "cases", "inpaint_masks")
    os.makedirs(out, exist_ok=True)
    image_processor = Flux2ImageProcessor(vae_scale_factor=16, vae_latent_channels=32)
    mask_processor = Flux2ImageProcessor(
        vae_scale_factor=16, vae_latent_channels=32, do_normalize=False, do_binarize=True,
        do_convert_rgb=False, do_convert_grayscale=True,
    )
    fake = SimpleNamespace(vae_scale_factor=8, _pack_latents=Flux2KleinInpaintPipeline._pack_latents)

    def grey_mask(width, height):
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        v = 255.0 * (0.5 + 0.5 * np.sin(x / width * 5.0 + y / height * 3.0))
        rgb = np.stack([v, v * 0.9, 255.0 - v], axis=-1).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(rgb, "RGB")

    items = [
        # A grey (non-binary) mask of another size than the 64x64 init image.
        dict(name="grey_other_size", init=(64, 64), mask=grey_mask(50, 70), pad=None),
        # A 72x136 init image (output 64x128) with a grey mask of its size.
        dict(name="grey_floored", init=(72, 136), mask=grey_mask(72, 136), pad=None),
        # Crops that do not have the output's aspect ratio: bars to fill, left/right...
        dict(name="crop_bars_x", init=(64, 128), mask=box_mask(64, 128, (20, 40, 38, 77)), pad=0),
        # ... and top/bottom.
        dict(name="crop_bars_y", init=(128, 64), mask=box_mask(128, 64, (40, 20, 77, 38)), pad=0),
        # A padded crop on a non-square image.
        dict(name="crop_pad", init=(96, 64), mask=box_mask(96, 64, (50, 10, 70, 30)), pad=6),
    ]
    records = []
    for it in items:
        iw, ih = it["init"]
        init = pattern(iw, ih, seed=len(it["name"]))
        mask = it["mask"]
        init.save(os.path.join(out, f"{it['name']}.init.png"))
        mask.save(os.path.join(out, f"{it['name']}.mask.png"))
        width, height = iw // 16 * 16, ih // 16 * 16
        if it["pad"] is not None:
            crop = mask_processor.get_crop_region(mask, width, height, pad=it["pad"])
            mode = "fill"
        else:
            crop, mode = None, "default"
        init_t = image_processor.preprocess(init, height, width, crops_coords=crop, resize_mode=mode)
        src = init.crop(crop) if crop is not None else init
        pil = image_processor.resize(src, height, width, resize_mode=mode).convert("RGB")
        again = image_processor.normalize(image_processor.numpy_to_pt(image_processor.pil_to_numpy(pil)))
        assert torch.equal(again, init_t)
        pil.save(os.path.join(out, f"{it['name']}.pixels.png"))
        mask_t = mask_processor.preprocess(mask, height=height, width=width, resize_mode=mode,
                                           crops_coords=crop)
        packed = Flux2KleinInpaintPipeline.prepare_mask_latents(
            fake, mask_t, 1, 1, height, width, torch.float32, "cpu")
        records.append({
            "name": it["name"],
            "init": f"{it['name']}.init.png",
            "mask": f"{it['name']}.mask.png",
            "pixels": f"{it['name']}.pixels.png",
            "padding_mask_crop": it["pad"],
            "crop": list(crop) if crop is not None else None,
            "size": [width, height],
            "mask_packed": [float(v) for v in packed.flatten()],
        })
    with open(os.path.join(out, "masks.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {out}: {len(records)} preprocessing checks")


preprocessing_fixtures()
