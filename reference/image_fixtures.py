"""Fixtures for tests/parity_image_io.rs: what Pillow / diffusers do to reference images.

Run with the refenv python from the repository root:

    ~/.cache/flux2-klein-refenv/bin/python reference/image_fixtures.py

Writes tests/fixtures/images/:
  * large_rgb.png (1500x1000), large_rgba.png (1200x1000), large_l.png (1100x1000) and for each
    `<name>.prepared.png`: the uint8 image Flux2KleinPipeline feeds the VAE (captured inside the
    real pipeline at `prepare_image_latents`, given `Image.open(p).convert("RGB")` as
    refcheck/make_case.py does), stored as round((x+1)/2*255), which is exact;
  * lanczos_src.png (157x113) and lanczos_<W>x<H>.png: Pillow LANCZOS outputs (both pass
    orders: 156x104, 150x50 and 200x60 run the vertical pass first in Pillow 13);
  * jpeg_{444,progressive,420}.jpg written by Pillow and jpeg_*.pillow.png, Pillow's decode;
  * mode_<kind>.png (PNG colour types / bit depths) and mode_<kind>.rgb.png, Pillow's
    `Image.open(p).convert("RGB")`;
  * exif_orientation_<n>.jpg (EXIF orientation n) and jpeg_gray.jpg with `<name>.expected.png`,
    what `diffusers.utils.load_image` returns (exif_transpose, then RGB);
  * manifest.json: sizes and the list of files.
"""

import json
import os
import struct
import sys
import zlib

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "images")
MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-w0")
os.makedirs(OUT, exist_ok=True)
rng = np.random.default_rng(1234)
manifest = {"lanczos": [], "jpeg": [], "modes": [], "large": []}


def detail_rgb(w, h, noise_box=6, steps=None):
    """Gradients + hard edges + a noisy patch. `steps` posterizes the gradients (flat bands
    compress well even after a LANCZOS resize, which keeps the ~1 MP fixtures small)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(x / 37.0) * np.cos(y / 23.0)
    img = np.stack([r, g, b], -1)
    if steps:
        img = np.round(img / 255 * (steps - 1)) * (255 / (steps - 1))
    # hard edges: a checkerboard band and a disc
    band = (y > h * 0.3) & (y < h * 0.45)
    checker = ((x // 8 + y // 8) % 2 == 0)
    img[band & checker] = [250, 20, 30]
    img[band & ~checker] = [5, 240, 10]
    disc = (x - w * 0.7) ** 2 + (y - h * 0.7) ** 2 < (min(w, h) * 0.15) ** 2
    img[disc] = [0, 0, 0]
    ring = np.abs(np.sqrt((x - w * 0.25) ** 2 + (y - h * 0.75) ** 2) - min(w, h) * 0.12) < 2
    img[ring] = [255, 255, 255]
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if noise_box:
        ph, pw = h // noise_box, w // noise_box
        img[h // 10:h // 10 + ph, w // 10:w // 10 + pw] = rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8)
    return img


def save(name, im, **kw):
    im.save(os.path.join(OUT, name), **kw)
    return name


# ---- (a) large references through the real pipeline preprocessing -----------------------------
def pipeline_prepared(pil_images):
    """The tensors Flux2KleinPipeline passes to prepare_image_latents (before the VAE)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(MODEL, dtype=torch.float32)
    captured = {}

    class Stop(Exception):
        pass

    def hook(images, *a, **kw):
        captured["images"] = [t.detach().clone() for t in images]
        raise Stop()

    pipe.prepare_image_latents = hook
    try:
        pipe(image=pil_images, prompt="a cat", num_inference_steps=1, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0))
    except Stop:
        pass
    return captured["images"]


large = {}
large["large_rgb"] = Image.fromarray(detail_rgb(1500, 1000, noise_box=14, steps=12))
rgba = detail_rgb(1040, 1010, noise_box=20, steps=6)
alpha = np.tile(np.linspace(0, 255, 1040).round().astype(np.uint8), (1010, 1))
alpha[:100] = 0  # fully transparent rows keep their colour in the file
large["large_rgba"] = Image.fromarray(np.dstack([rgba, alpha]), "RGBA")
lum = detail_rgb(1100, 1000, noise_box=0, steps=8)[..., 1]
lum[200:300, 200:400] = rng.integers(0, 256, (100, 200), dtype=np.uint8)
large["large_l"] = Image.fromarray(lum, "L")
for name, im in large.items():
    save(f"{name}.png", im, optimize=True)
opened = []
for name in large:
    im = Image.open(os.path.join(OUT, f"{name}.png"))
    im.load()
    opened.append(im.convert("RGB"))  # as refcheck/make_case.py
tensors = pipeline_prepared(opened)
for name, t, src in zip(large, tensors, opened):
    assert t.dtype == torch.float32 and t.shape[0] == 1, t.shape
    u8f = ((t[0].double() + 1) / 2 * 255).round()
    u8 = u8f.clamp(0, 255).to(torch.uint8)
    # exactness: the stored uint8 must map back to the same float32 values
    back = (u8.numpy().astype(np.float32) / 255.0) * 2.0 - 1.0
    assert np.array_equal(back, t[0].numpy()), name
    Image.fromarray(u8.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(OUT, f"{name}.prepared.png"), optimize=True)
    manifest["large"].append({"src": f"{name}.png", "src_mode": large[name].mode,
                              "src_size": list(src.size), "prepared": f"{name}.prepared.png",
                              "prepared_size": [t.shape[3], t.shape[2]]})
    print(name, src.size, "->", (t.shape[3], t.shape[2]))

# What diffusers would do with the raw (not converted) RGBA / L images, for the report only.
raw = [Image.open(os.path.join(OUT, f"{n}.png")) for n in ("large_rgba", "large_l")]
for n, t_raw, t_conv in zip(("large_rgba", "large_l"), pipeline_prepared(raw), tensors[1:]):
    d = ((t_raw - t_conv).abs() * 127.5).max().item()
    print(f"{n}: raw-mode pipeline vs convert('RGB') first: max |diff| = {d:.1f}/255")

# ---- (b) Pillow LANCZOS pairs ------------------------------------------------------------------
src = Image.fromarray(detail_rgb(157, 113))
save("lanczos_src.png", src)
for size in [(61, 47), (300, 200), (157, 50), (40, 113), (13, 9), (158, 114), (100, 257), (156, 104), (150, 50), (200, 60)]:
    name = f"lanczos_{size[0]}x{size[1]}.png"
    save(name, src.resize(size, Image.Resampling.LANCZOS))
    manifest["lanczos"].append({"src": "lanczos_src.png", "out": name, "size": list(size)})
# the spec's worked example 1500x1000 -> 1254x836 is checked through large_rgb.prepared.png

# ---- (c) JPEGs written and decoded by Pillow ---------------------------------------------------
jsrc = Image.fromarray(detail_rgb(256, 192))
for name, kw in [("jpeg_444", dict(quality=90, subsampling=0)),
                 ("jpeg_progressive", dict(quality=90, progressive=True, subsampling=2)),
                 ("jpeg_420", dict(quality=90, subsampling=2))]:
    save(f"{name}.jpg", jsrc, **kw)
    dec = Image.open(os.path.join(OUT, f"{name}.jpg"))
    dec.load()
    assert dec.mode == "RGB"
    save(f"{name}.pillow.png", dec)
    manifest["jpeg"].append({"jpg": f"{name}.jpg", "pillow": f"{name}.pillow.png"})


# ---- (d) PNG colour types: Pillow's open + convert("RGB") --------------------------------------
def write_png(path, rows, color_type, bit_depth, extra=b""):
    """Minimal PNG writer for the types Pillow cannot write (16-bit RGB, 4-bit grey...)."""
    h = len(rows)
    w_bytes = len(rows[0])

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    samples = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    width = w_bytes * 8 // (bit_depth * samples)
    ihdr = struct.pack(">IIBBBBB", width, h, bit_depth, color_type, 0, 0, 0)
    raw_data = b"".join(b"\x00" + bytes(r) for r in rows)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(raw_data))
                + chunk(b"IEND", b""))


W, H = 80, 72
base = detail_rgb(W, H, noise_box=0)
grey = base[..., 0]
modes = {}
modes["l8"] = lambda p: Image.fromarray(grey, "L").save(p)
modes["la8"] = lambda p: Image.fromarray(np.dstack([grey, base[..., 1]]), "LA").save(p)
modes["rgba8"] = lambda p: Image.fromarray(np.dstack([base, base[..., 2]]), "RGBA").save(p)
modes["p"] = lambda p: Image.fromarray(base).quantize(37).save(p)
modes["p_trns"] = lambda p: Image.fromarray(base).quantize(37).save(p, transparency=3)
modes["rgb_trns"] = lambda p: Image.fromarray(base).save(p, transparency=(250, 20, 30))
modes["l_trns"] = lambda p: Image.fromarray(grey, "L").save(p, transparency=0)
modes["gray1"] = lambda p: Image.fromarray(grey > 128).save(p)
g16 = (rng.integers(0, 65536, (H, W)) * (np.arange(W) % 2 == 0) + rng.integers(0, 300, (H, W))).astype(">u2")
modes["gray16"] = lambda p: write_png(p, [r.tobytes() for r in g16], 0, 16)
modes["gray4"] = lambda p: write_png(p, [bytes(((r[0::2] >> 4) << 4) | (r[1::2] >> 4)) for r in grey], 0, 4)
modes["gray2"] = lambda p: write_png(p, [bytes(((r[0::4] >> 6) << 6) | ((r[1::4] >> 6) << 4) | ((r[2::4] >> 6) << 2) | (r[3::4] >> 6)) for r in grey], 0, 2)
rgb16 = rng.integers(0, 65536, (H, W, 3)).astype(">u2")
modes["rgb16"] = lambda p: write_png(p, [r.tobytes() for r in rgb16], 2, 16)
rgba16 = rng.integers(0, 65536, (H, W, 4)).astype(">u2")
modes["rgba16"] = lambda p: write_png(p, [r.tobytes() for r in rgba16], 6, 16)
la16 = rng.integers(0, 65536, (H, W, 2)).astype(">u2")
modes["la16"] = lambda p: write_png(p, [r.tobytes() for r in la16], 4, 16)
for kind, writer in modes.items():
    path = os.path.join(OUT, f"mode_{kind}.png")
    writer(path)
    im = Image.open(path)
    im.load()
    mode = im.mode
    rgb = im.convert("RGB")
    rgb.info.pop("transparency", None)  # else Pillow writes a tRNS colour key for it
    rgb.save(os.path.join(OUT, f"mode_{kind}.rgb.png"))
    manifest["modes"].append({"src": f"mode_{kind}.png", "pil_mode": mode, "rgb": f"mode_{kind}.rgb.png"})

# ---- (e) diffusers.utils.load_image: EXIF orientation applied (ImageOps.exif_transpose), then
# convert("RGB"); plus a grayscale JPEG (Pillow mode L) -----------------------------------------
from diffusers.utils import load_image

manifest["load_image"] = []
osrc = Image.fromarray(detail_rgb(48, 32))
for orientation in [1, 3, 6, 8, 5]:
    exif = Image.Exif()
    exif[0x0112] = orientation
    name = f"exif_orientation_{orientation}"
    save(f"{name}.jpg", osrc, quality=90, exif=exif.tobytes())
    save(f"{name}.expected.png", load_image(os.path.join(OUT, f"{name}.jpg")))
    manifest["load_image"].append({"src": f"{name}.jpg", "expected": f"{name}.expected.png"})
save("jpeg_gray.jpg", Image.fromarray(detail_rgb(64, 48)[..., 1], "L"), quality=85)
save("jpeg_gray.expected.png", load_image(os.path.join(OUT, "jpeg_gray.jpg")))
manifest["load_image"].append({"src": "jpeg_gray.jpg", "expected": "jpeg_gray.expected.png"})

import PIL
manifest["pillow"] = PIL.__version__
import diffusers
manifest["diffusers"] = diffusers.__version__
with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
print(f"wrote {len(os.listdir(OUT))} files, {total / 1e6:.2f} MB, to {OUT}")
