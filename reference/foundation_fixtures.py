#!/usr/bin/env python3
"""Writes tests/fixtures/foundation/{scheduler,noise}.json from diffusers 0.42.1 / torch itself.

Run with the refenv python (torch 2.15, diffusers 0.42.1):
    ~/.cache/flux2-klein-refenv/bin/python reference/foundation_fixtures.py

scheduler.json: what `Flux2KleinPipeline.__call__` computes in step 6 (sigmas = linspace(1, 1/n, n),
mu = compute_empirical_mu(h*w, n), retrieve_timesteps(scheduler, n, sigmas=..., mu=...)) with the
tiny model's scheduler config (falling back to the FLUX.2 config of spec §0), plus the bf16/f32
timestep the pipeline feeds the transformer and the dt of each Euler step. Also a few entries for
other configs (static shift, linear time shift) to cover those code paths. Every f32 value is
stored as its bit pattern (u32) too, so the Rust test compares bits, not decimal strings.

noise.json: sha256 / sum / first values of real `torch.randn(shape, generator=Generator('cpu')
.manual_seed(seed), dtype)` for several seeds and shapes, f32, bf16 and f16.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "foundation")
TINY_CFG = os.path.join(ROOT, "tests", "fixtures", "models", "tiny-w0", "scheduler", "scheduler_config.json")
SPEC_CFG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def bits(t):
    return [int(x) for x in t.detach().cpu().float().contiguous().numpy().view(np.uint32)]


def floats(t):
    return [float(x) for x in t.detach().cpu().float().numpy()]


def schedule_entry(scheduler, height, width, n):
    h, w = height // 16, width // 16  # 2 * (H // 16) // 2
    seq = h * w
    sigmas_in = np.linspace(1.0, 1 / n, n)
    mu = compute_empirical_mu(image_seq_len=seq, num_steps=n)
    timesteps, _ = retrieve_timesteps(scheduler, n, "cpu", sigmas=sigmas_in, mu=mu)
    sig = scheduler.sigmas
    e = dict(height=height, width=width, image_seq_len=seq, num_steps=n, mu=mu,
             mu_bits=int(np.float64(mu).view(np.uint64)),
             timesteps=floats(timesteps), timesteps_bits=bits(timesteps),
             sigmas=floats(sig), sigmas_bits=bits(sig))
    # What the loop feeds the transformer: t.expand(B).to(latents.dtype) / 1000.
    for name, dt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        fed = torch.stack([t.expand(1).to(dt) / 1000 for t in timesteps]).flatten()
        e[f"model_timestep_{name}"] = floats(fed)
        e[f"model_timestep_{name}_bits"] = bits(fed)
    # Euler dt: sigma_next - sigma (0-dim f32), and its bf16 rounding used with bf16 model output.
    dts = torch.stack([sig[i + 1] - sig[i] for i in range(n)])
    e["dt_f32_bits"] = bits(dts)
    e["dt_bf16"] = floats(dts.to(torch.bfloat16))
    e["dt_bf16_bits"] = bits(dts.to(torch.bfloat16))
    return e


def scheduler_fixture():
    if os.path.exists(TINY_CFG):
        with open(TINY_CFG) as f:
            cfg = json.load(f)
        cfg_src = "tests/fixtures/models/tiny-w0/scheduler/scheduler_config.json"
    else:
        cfg = dict(SPEC_CFG)
        cfg_src = "spec §0"
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    entries = []
    sizes = [(1024, 1024), (512, 512), (256, 512), (512, 256), (64, 64), (1000, 520), (1536, 1536)]
    for (hh, ww) in sizes:
        for n in (1, 2, 3, 4, 8, 28, 50):
            if n in (2, 3, 8) and (hh, ww) not in ((1024, 1024), (64, 64)):
                continue
            entries.append(schedule_entry(sched, hh, ww, n))
    # Other configurations (not used by klein; cover the static-shift and linear branches).
    extra = []
    for name, over in (("static_shift3", dict(use_dynamic_shifting=False, shift=3.0)),
                       ("linear", dict(time_shift_type="linear")),
                       ("class_defaults", None)):
        c = FlowMatchEulerDiscreteScheduler() if over is None else FlowMatchEulerDiscreteScheduler.from_config({**cfg, **over})
        ents = [schedule_entry(c, hh, ww, n) for (hh, ww, n) in ((1024, 1024, 4), (512, 512, 28), (64, 64, 1))]
        extra.append(dict(name=name, config=dict(c.config), entries=ents))
    return dict(diffusers=diffusers.__version__, torch=torch.__version__, config_source=cfg_src,
                config=dict(sched.config), entries=entries, other_configs=extra)


def noise_fixture():
    seeds = [0, 42, 2 ** 40 + 5, 123456789, 2 ** 32 - 1]
    shapes = [[1, 128, 64, 64], [2, 128, 3, 5], [1, 128, 4, 8], [1, 16, 4, 4], [3, 5, 7], [17], [5], [1]]
    out = []
    for seed in seeds:
        for shape in shapes:
            for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
                if name == "f16" and shape == [1, 128, 64, 64] and seed not in (0,):
                    continue
                x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dt)
                raw = x.contiguous().view(torch.int16 if dt != torch.float32 else torch.int32).numpy().astype(
                    "<i2" if dt != torch.float32 else "<i4").tobytes()
                xf = x.double().flatten()
                out.append(dict(seed=seed, shape=shape, dtype=name, sha256=hashlib.sha256(raw).hexdigest(),
                                sum=float(xf.sum()), first=[float(v) for v in xf[:16]]))
    # diffusers' randn_tensor with a list of CPU generators (one per batch sample).
    from diffusers.utils.torch_utils import randn_tensor
    per_sample = []
    for seeds, shape in (([0, 42], [2, 128, 4, 8]), ([7, 7, 123456789], [3, 16, 4, 4])):
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            x = randn_tensor(tuple(shape), generator=gens, device=torch.device("cpu"), dtype=dt)
            per_sample.append(dict(seeds=seeds, shape=shape, dtype=name, sha256=hashlib.sha256(x.float().numpy().astype("<f4").tobytes()).hexdigest()))
    return dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(), cases=out,
                per_sample=per_sample)


def bn_fixture():
    """VAE batch-norm statistics and (de)normalisation exactly as the pipeline computes them
    (`_encode_vae_image` / the decode path of `__call__`), for the tiny models in f32 and bf16.

    Note: torch's CPU f32 `sqrt` is not correctly rounded (about 17 % of inputs are 1 ulp off on
    this machine), so `std_bits` lets the Rust test separate that from everything else."""
    from safetensors.torch import load_file
    out = []
    g = torch.Generator("cpu").manual_seed(1234)
    for model in ("tiny-w0", "tiny2-w0"):
        vdir = os.path.join(ROOT, "tests", "fixtures", "models", model, "vae")
        if not os.path.exists(vdir):
            continue
        with open(os.path.join(vdir, "config.json")) as f:
            eps = json.load(f)["batch_norm_eps"]
        sd = load_file(os.path.join(vdir, "diffusion_pytorch_model.safetensors"))
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            rm, rv = sd["bn.running_mean"].to(dt), sd["bn.running_var"].to(dt)
            c = rm.numel()
            z = torch.randn((1, c, 3, 5), generator=g).to(dt)
            mean = rm.view(1, -1, 1, 1).to(z.device, z.dtype)
            std = torch.sqrt(rv.view(1, -1, 1, 1) + eps).to(z.device, z.dtype)
            normed = (z - mean) / std
            denormed = z * std + mean
            out.append(dict(model=model, dtype=name, eps=eps, channels=c, shape=[1, c, 3, 5],
                            std_bits=bits(std.flatten()), z_bits=bits(z.flatten()),
                            normalized_bits=bits(normed.flatten()), denormalized_bits=bits(denormed.flatten())))
    return dict(torch=torch.__version__, cases=out)


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "scheduler.json"), "w") as f:
        json.dump(scheduler_fixture(), f, separators=(",", ":"))
    with open(os.path.join(OUT, "noise.json"), "w") as f:
        json.dump(noise_fixture(), f, indent=0)
    with open(os.path.join(OUT, "bn.json"), "w") as f:
        json.dump(bn_fixture(), f, separators=(",", ":"))
    print("wrote", OUT)


if __name__ == "__main__":
    sys.exit(main())
