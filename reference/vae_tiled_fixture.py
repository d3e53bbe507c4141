"""Fixture for tests/parity_vae.rs: diffusers' own tiled VAE decode/encode on the tiny model.

Writes tests/fixtures/vae_tiled/tensors.safetensors (~260 KB) with
  z            [1,4,16,20] f32  latent (seeded randn)
  dec_tiled    [1,3,128,160]    AutoencoderKLFlux2.decode(z) with tiling on
  enc_tiled    [1,4,16,20]      encode(clamp(dec_tiled,-1,1)).latent_dist.mode() with tiling on
Tiling: tile_latent_min_size 8, tile_sample_min_size 64, tile_overlap_factor 0.25, i.e. our
TileOptions { tile: 8, overlap: 2 } (3x3 / 3x4 tiles, partial edge tiles included).

Run: ~/.cache/flux2-klein-refenv/bin/python reference/vae_tiled_fixture.py
"""
import os

import torch
from diffusers import AutoencoderKLFlux2
from safetensors.torch import save_file

torch.set_num_threads(1)
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
vae = AutoencoderKLFlux2.from_pretrained(os.path.join(root, "models", "tiny-w0", "vae"), torch_dtype=torch.float32)
vae.eval()
vae.use_tiling = True
vae.tile_latent_min_size = 8
vae.tile_sample_min_size = 64
vae.tile_overlap_factor = 0.25

g = torch.Generator("cpu").manual_seed(1234)
z = torch.randn((1, 4, 16, 20), generator=g, dtype=torch.float32)
with torch.no_grad():
    dec = vae.decode(z).sample
    x = dec.clamp(-1, 1)
    enc = vae.encode(x).latent_dist.mode()
    vae.use_tiling = False
    dec_full = vae.decode(z).sample
print("dec", tuple(dec.shape), "enc", tuple(enc.shape))
print("diffusers tiled vs untiled decode: max abs", (dec - dec_full).abs().max().item(),
      "mean abs", (dec - dec_full).abs().mean().item(), "max |x|", dec_full.abs().max().item())
out = os.path.join(root, "vae_tiled")
os.makedirs(out, exist_ok=True)
save_file({"z": z.contiguous(), "dec_tiled": dec.contiguous(), "enc_tiled": enc.contiguous()},
          os.path.join(out, "tensors.safetensors"))
print("wrote", out)
