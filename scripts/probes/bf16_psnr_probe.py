"""Will the 1024² PSNR bar of #7 (ours bf16 vs diffusers bf16 ≥ 30 dB) be reachable with the
benchmark weights? A CPU proxy, no GPU needed:

    ~/.cache/flux2-klein-refenv/bin/python scripts/probes/bf16_psnr_probe.py [SIZE] [QK,MOD]

The full-size random klein-4B transformer and VAE of `gpu_bench.py make-model` (same seeds and
recipe, default q/k-norm scale 1, modulation ×0.3), weights rounded to bf16 as the checkpoint
stores them, run through diffusers' Flux2KleinPipeline at SIZE² (default 256) for 4 steps with
random prompt embeddings (the text encoder is left out: 16 GB in f32). Prints the relative
difference of the final latents and the uint8 image PSNR against the all-f32 run of: bf16
throughout (what scripts/gpu/gpu.sh's floor measured before it fed the f32 run bf16 timesteps), bf16
transformer + f32 VAE, and f32 transformer + bf16 VAE (which part loses the dBs), and f32 fed
the bf16 run's timesteps. PROBE_MATCHED_ONLY=1: only bf16 vs f32 fed the bf16 timesteps."""
import copy, math, os, sys, time
import numpy as np
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gpu"))
import gpu_bench
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

torch.set_num_threads(os.cpu_count() or 2)
gpu_bench.device = lambda: "cpu"
size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
qk, mod = (float(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1,0.3").split(","))
_, tr_cfg, vae_cfg = gpu_bench.klein4b_configs()
t0 = time.time()
torch.set_default_dtype(torch.float32)
tr = Flux2Transformer2DModel(**tr_cfg).eval()
gpu_bench.randomize_(tr, 2, qk_scale=qk)
vae = AutoencoderKLFlux2(**vae_cfg).eval()
gpu_bench.randomize_(vae, 3, qk_scale=1.0)
with torch.no_grad():
    for name, p in tr.named_parameters():
        if "modulation" in name:
            p.mul_(mod)
    # make-model's VAE output calibration
    g = torch.Generator().manual_seed(4)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.5)
    vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.running_var.shape, generator=g))
    z = torch.randn((1, vae_cfg["latent_channels"], 16, 16), generator=g)
    o = vae.decode(z, return_dict=False)[0]
    s = 0.45 / float(o.std())
    vae.decoder.conv_out.weight.mul_(s)
    vae.decoder.conv_out.bias.mul_(s)
    vae.decoder.conv_out.bias.sub_(float(vae.decode(z, return_dict=False)[0].mean()))
    for m in (tr, vae):  # the checkpoint holds bf16 values; both runs start from them
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
print(f"models ready ({time.time() - t0:.0f}s)", flush=True)

sched = FlowMatchEulerDiscreteScheduler(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    time_shift_type="exponential", stochastic_sampling=False)
pipe = Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=tr,
                          is_distilled=True)
g = torch.Generator().manual_seed(0)
emb = torch.randn(1, 512, 7680, generator=g)
noise = torch.randn(1, 128, size // 16, size // 16, generator=g)


vae_f32 = copy.deepcopy(vae)


def latents(dtype, bf16_timesteps=False):
    """The transformer's final latents (VAE space: BN de-normalised, unpatchified) in `dtype`;
    with bf16_timesteps the (f32) transformer gets the timesteps rounded to bf16, as a bf16 run
    (and flux2-klein, bit for bit) feeds them."""
    pipe.to(dtype)
    t = time.time()
    forward = tr.forward
    if bf16_timesteps:
        # A bf16 run rounds t (the pipeline's timestep.to(bf16)), t / 1000 (the pipeline) and
        # that * 1000 (the transformer): the f32 run gets the same value of t (to 1 f32 ulp).
        def bf16_t(ts):
            t_model = ((ts * 1000).to(torch.bfloat16) / 1000) * 1000  # bf16 ops, as in a bf16 run
            return t_model.to(dtype) / 1000
        tr.forward = lambda *a, **k: forward(*a, **{**k, "timestep": bf16_t(k["timestep"])})
    with torch.no_grad():
        out = pipe(prompt_embeds=emb.to(dtype), latents=noise.to(dtype), height=size, width=size,
                   num_inference_steps=4, guidance_scale=1.0, output_type="latent").images
    tr.forward = forward
    print(f"  transformer {dtype}{' (bf16 timesteps)' if bf16_timesteps else ''}: {time.time() - t:.0f}s", flush=True)
    return out


def decode(vae_model, lat):
    """diffusers' decode and postprocess to uint8 (PIL's rounding)."""
    with torch.no_grad():
        img = vae_model.decode(lat.to(vae_model.dtype), return_dict=False)[0]
        img = pipe.image_processor.postprocess(img, output_type="np")[0]
    return np.round(img * 255).clip(0, 255).astype(np.uint8)


def psnr(a, b):
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return (10 * math.log10(255 ** 2 / mse) if mse else float("inf")), int(np.abs(a.astype(int) - b).max())


rel = lambda a, b: float((a.float() - b).norm() / b.norm())
if os.environ.get("PROBE_MATCHED_ONLY"):  # only the comparison that matters, ~half the time
    lat32t = latents(torch.float32, bf16_timesteps=True)
    lat16 = latents(torch.bfloat16)
    p, m = psnr(decode(vae_f32, lat16.float()), decode(vae_f32, lat32t))
    print(f"size {size}², qk {qk}, mod {mod}: bf16 vs f32 with bf16 timesteps: latents {rel(lat16, lat32t):.2e}, "
          f"image PSNR {p:.1f} dB (max diff {m}); total {time.time() - t0:.0f}s")
    sys.exit(0)
lat32 = latents(torch.float32)
lat32t = latents(torch.float32, bf16_timesteps=True)
lat16 = latents(torch.bfloat16)  # pipe.vae is bf16 from here on
ref, ref_t = decode(vae_f32, lat32), decode(vae_f32, lat32t)
print(f"size {size}², qk {qk}, mod {mod}: final latents, relative L2: bf16 vs f32 {rel(lat16, lat32):.2e}, "
      f"bf16 vs f32 with bf16 timesteps {rel(lat16, lat32t):.2e}, f32 vs f32 with bf16 timesteps {rel(lat32t, lat32):.2e}")
rows = [("bf16 (transformer and VAE, the GPU floor) vs f32", decode(pipe.vae, lat16), ref),
        ("bf16 transformer + f32 VAE vs f32", decode(vae_f32, lat16.float()), ref),
        ("f32 transformer + bf16 VAE vs f32", decode(pipe.vae, lat32), ref),
        ("f32 with bf16 timesteps vs f32", ref_t, ref),
        ("bf16 vs f32 with bf16 timesteps (same VAE f32)", decode(vae_f32, lat16.float()), ref_t)]
for name, img, base in rows:
    p, m = psnr(img, base)
    print(f"size {size}², qk {qk}, mod {mod}: {name}: PSNR {p:.1f} dB (max diff {m})")
print(f"total {time.time() - t0:.0f}s")
