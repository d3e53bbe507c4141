#!/usr/bin/env python3
"""diffusers side of the GPU benchmark (scripts/gpu/gpu.sh runs it; needs torch + CUDA + diffusers).

    gpu_bench.py make-model DIR [QK [MOD]]  random full-size klein-4B (bf16) in diffusers layout
    gpu_bench.py refs DIR                the two reference images of the edit workload
    gpu_bench.py diffusers DIR OUTDIR    warm per-stage timings + images (same noise as --seed)
    gpu_bench.py cold DIR OUT.png        one fresh-process run (from_pretrained + call)
    gpu_bench.py image DIR DTYPE SIZE OUT.png [bf16]
                                         one SIZE² image in float32/bfloat16 (bf16: an f32 run
                                         fed a bf16 run's timesteps, the noise floor's reference)
    gpu_bench.py psnr A.png B.png        PSNR and max difference of two images
    gpu_bench.py verdict OUT             issue #7's speed/quality bars from the files in OUT

Noise: diffusers gets `latents=` drawn from the CPU generator in float32 and rounded to bf16,
which is exactly what `flux2-klein --seed N` uses (spec §10: torch 2.11 on the GPU machines
would otherwise draw bf16 noise with its legacy algorithm).
"""

import json
import math
import os
import sys
import time

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "tokenizer")
PROMPT = 'A cat holding a sign that says "Gifu AI Study Group"'
SEED = 0


def klein4b_configs():
    text = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                attention_bias=False, hidden_act="silu")
    transformer = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                       timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                       rope_theta=2000, eps=1e-6, guidance_embeds=False)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=32, norm_num_groups=32, sample_size=1024,
               use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
               batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=(2, 2))
    return text, transformer, vae


def randomize_(module, seed, qk_scale=3.0):
    """N(0, 1/fan_in) matrices, 1+N(0,0.2²) norm scales (q/k norms ×3), N(0,0.1²) biases: the
    tiny fixtures' recipe, so activations stay O(1) through all layers."""
    import torch
    dev = device()
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(std))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.1)
            else:
                s = qk_scale if any(k in name for k in ("norm_q.", "norm_k.", "norm_added_q.", "norm_added_k.", "q_norm.", "k_norm.")) else 1.0
                p.copy_(s * (1.0 + torch.randn(p.shape, generator=g, device=dev) * 0.2))


def make_model(out, qk_scale="1.0", mod_scale="0.3"):
    """The benchmark checkpoint. Timings do not depend on the values, but the bf16 image
    comparison does: with the tiny fixtures' q/k-norm scale of 3 and O(1) modulation, attention
    is nearly one-hot and bf16 rounding changes the image (diffusers bf16 vs diffusers f32 was
    21.5 dB at 512²). Measured on the CPU (4 Euler steps of the full-size transformer, 64 image
    + 512 text tokens, final latents bf16 vs f32): relative difference 14 % with q/k scale 3,
    6.5 % with 1, 3.0 % with 1 and the modulation linears ×0.3, so those are the defaults
    (`QK` for the transformer's and Qwen3's q/k norms, `MOD` for the modulation weights)."""
    import shutil
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM
    t0 = time.time()
    text_cfg, tr_cfg, vae_cfg = klein4b_configs()
    torch.set_default_dtype(torch.bfloat16)
    dev = device()
    with torch.device(dev):
        te = Qwen3ForCausalLM(Qwen3Config(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                          **text_cfg)).eval()
        randomize_(te, 1, qk_scale=float(qk_scale))
        tr = Flux2Transformer2DModel(**tr_cfg).eval()
        randomize_(tr, 2, qk_scale=float(qk_scale))
        with torch.no_grad():
            for name, p in tr.named_parameters():
                if "modulation" in name:
                    p.mul_(float(mod_scale))
        torch.set_default_dtype(torch.float32)
        vae = AutoencoderKLFlux2(**vae_cfg).eval()
        randomize_(vae, 3, qk_scale=1.0)
        g = torch.Generator(dev).manual_seed(4)
        with torch.no_grad():
            vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g, device=dev) * 0.5)
            vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.running_var.shape, generator=g, device=dev))
            z = torch.randn((1, vae_cfg["latent_channels"], 16, 16), generator=g, device=dev)
            o = vae.decode(z, return_dict=False)[0]
            s = 0.45 / float(o.std())
            vae.decoder.conv_out.weight.mul_(s)
            vae.decoder.conv_out.bias.mul_(s)
            vae.decoder.conv_out.bias.sub_(float(vae.decode(z, return_dict=False)[0].mean()))
        vae = vae.to(torch.bfloat16)
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        time_shift_type="exponential", stochastic_sampling=False)
    tok = Qwen2TokenizerFast.from_pretrained(TOKENIZER)
    pipe = Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr,
                              is_distilled=True)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "tokenizer"))
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER, n), os.path.join(out, "tokenizer", n))
    recipe = {"qk_scale": float(qk_scale), "modulation_scale": float(mod_scale), "seeds": [1, 2, 3, 4]}
    with open(os.path.join(out, "bench_recipe.json"), "w") as f:
        json.dump(recipe, f)
    print(json.dumps({"make_model_s": round(time.time() - t0, 1), **recipe}))


def make_refs(out):
    import numpy as np
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(605, 807), (1500, 1000)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(out, f"ref{i}.png"))


def device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def noise_latents(h, w, channels=128):
    import torch
    g = torch.Generator("cpu").manual_seed(SEED)
    x = torch.randn((1, channels, h // 16, w // 16), generator=g, dtype=torch.float32)
    return x.to(torch.bfloat16).to(device())


def load_pipe(model):
    import torch
    from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline.from_pretrained(model, torch_dtype=torch.bfloat16).to(device())


def run_once(pipe, w, h, refs):
    """One call with per-stage times (text encode, each step, VAE decode), synchronised."""
    import torch
    times = {}
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)
    orig_encode = pipe.encode_prompt
    orig_decode = pipe.vae.decode

    def enc(*a, **k):
        sync(); t = time.perf_counter(); r = orig_encode(*a, **k); sync()
        times["text_encode_ms"] = (time.perf_counter() - t) * 1e3
        return r

    def dec(*a, **k):
        sync(); t = time.perf_counter(); r = orig_decode(*a, **k); sync()
        times["vae_decode_ms"] = (time.perf_counter() - t) * 1e3
        return r

    steps = []
    last = [None]

    def cb(p, i, t, kw):
        sync(); now = time.perf_counter()
        steps.append((now - last[0]) * 1e3)
        last[0] = now
        return {}

    # The references are decoded before the clock starts: `flux2-klein bench` decodes its
    # --ref files once, before its runs, so neither side's time includes file decoding.
    kwargs = {}
    if refs:
        from PIL import Image
        kwargs["image"] = [Image.open(r).convert("RGB") for r in refs]
    pipe.encode_prompt, pipe.vae.decode = enc, dec
    try:
        sync(); t0 = time.perf_counter()
        # the first step's clock starts after the text encoder and reference encoding
        orig_prepare = pipe.prepare_latents
        orig_prepare_image = pipe.prepare_image_latents

        def prep(*a, **k):
            r = orig_prepare(*a, **k); sync(); last[0] = time.perf_counter(); return r

        def prep_image(*a, **k):
            sync(); t = time.perf_counter(); r = orig_prepare_image(*a, **k); sync()
            times["reference_encode_ms"] = (time.perf_counter() - t) * 1e3
            last[0] = time.perf_counter()
            return r
        pipe.prepare_latents = prep
        pipe.prepare_image_latents = prep_image
        img = pipe(prompt=PROMPT, height=h, width=w, num_inference_steps=4, guidance_scale=1.0,
                   latents=noise_latents(h, w, pipe.transformer.config.in_channels), callback_on_step_end=cb, **kwargs).images[0]
        sync()
        times["total_ms"] = (time.perf_counter() - t0) * 1e3
        pipe.prepare_latents = orig_prepare
        pipe.prepare_image_latents = orig_prepare_image
    finally:
        pipe.encode_prompt, pipe.vae.decode = orig_encode, orig_decode
    times["step_ms"] = steps
    return img, times


def diffusers_bench(model, outdir, refdir):
    import torch
    os.makedirs(outdir, exist_ok=True)
    t0 = time.time()
    pipe = load_pipe(model)
    load_s = time.time() - t0
    results = {"load_s": load_s}
    workloads = [("t2i_1024", 1024, 1024, []), ("t2i_512", 512, 512, []),
                 ("edit2_1024", 1024, 1024, [os.path.join(refdir, "ref0.png"), os.path.join(refdir, "ref1.png")])]
    only = os.environ.get("DIFFUSERS_WORKLOADS")
    if only:
        workloads = [x for x in workloads if x[0] in only.split(",")]
    for name, w, h, refs in workloads:
        run_once(pipe, w, h, refs)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(int(os.environ.get("DIFFUSERS_RUNS", "3"))):
            img, t = run_once(pipe, w, h, refs)
            runs.append(t)
        img.save(os.path.join(outdir, f"diffusers_{name}.png"))
        results[name] = {"runs": runs, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(name, json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in runs[-1].items()}), flush=True)
    json.dump(results, open(os.path.join(outdir, "diffusers.json"), "w"), indent=1)


def cold(model, out):
    pipe = load_pipe(model)
    img, _ = run_once(pipe, 1024, 1024, [])
    img.save(out)


def image(model, dtype, size, out, timesteps="exact"):
    """One image with diffusers in `dtype` (float32 or bfloat16) at `size` (e.g. 512), seed-0 noise.
    `timesteps=bf16`: the transformer gets the time value a bf16 run computes (the pipeline rounds
    t to bf16, divides by 1000 in bf16, the transformer multiplies by 1000 in bf16; 773.41 becomes
    772). On random weights that rounding alone moves the image as far as all other bf16
    rounding together (CPU, 512²: f32 vs f32 with bf16 timesteps 35.6 dB, bf16 vs f32 35.4 dB,
    bf16 vs f32 with bf16 timesteps 51.9 dB; scripts/probes/bf16_psnr_probe.py), and flux2-klein feeds
    the bf16 value bit for bit, so an f32 floor for a bf16 comparison must use it too."""
    import torch
    from diffusers import Flux2KleinPipeline
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    pipe = Flux2KleinPipeline.from_pretrained(model, torch_dtype=dt).to(device())
    if timesteps == "bf16":
        forward = pipe.transformer.forward

        def bf16_t(ts):
            return (((ts * 1000).to(torch.bfloat16) / 1000) * 1000).to(dt) / 1000

        pipe.transformer.forward = lambda *a, **k: forward(*a, **{**k, "timestep": bf16_t(k["timestep"])})
    n = int(size)
    lat = noise_latents(n, n, pipe.transformer.config.in_channels).to(dt)
    img = pipe(prompt=PROMPT, height=n, width=n, num_inference_steps=4, guidance_scale=1.0,
               latents=lat).images[0]
    img.save(out)


def image_pair(a, b):
    import numpy as np
    from PIL import Image
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    return x, y


def psnr_db(x, y):
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def psnr(a, b):
    missing = [p for p in (a, b) if not os.path.exists(p)]
    if missing:  # an earlier step failed or was skipped; its log says why
        print(json.dumps({"error": f"missing {missing}"}))
        return
    x, y = image_pair(a, b)
    if x.shape != y.shape:
        print(json.dumps({"error": f"shapes differ {x.shape} {y.shape}"}))
        return
    print(json.dumps({"a": a, "b": b, "psnr_db": round(psnr_db(x, y), 2), "max_diff": int(abs(x - y).max()),
                      "mean_diff": round(float(abs(x - y).mean()), 4)}))


def verdict(out):
    """The bars of issue #7 that one gpu.sh run measures, from ours_bench*.json (flux2-klein
    bench --json), diffusers.json and the two 1024² images; a missing input says so."""
    def load(name):
        try:
            return json.load(open(os.path.join(out, name)))
        except Exception:
            return None

    def ours_summary(doc, refs):
        for row in (doc or {}).get("summary", []):
            if row.get("width") == 1024 and row.get("height") == 1024 and row.get("refs") == refs:
                return {k: v["mean"] for k, v in row.items() if isinstance(v, dict) and "mean" in v} | {
                    "peak": row.get("peak_device_memory_bytes")}
        return None

    def theirs(doc, name):
        runs = ((doc or {}).get(name) or {}).get("runs") or []
        if not runs:
            return None
        mean = lambda k: sum(r[k] for r in runs) / len(runs)
        return {"total_ms": mean("total_ms"), "text_encode_ms": mean("text_encode_ms"),
                "peak_gib": doc[name].get("peak_gib")}

    ours_doc = load("ours_bench.json") or {}
    ours_t2i = ours_summary(ours_doc, 0)
    ours_edit = ours_summary(load("ours_bench_edit.json"), 2)
    d = load("diffusers.json")
    d_t2i, d_edit = theirs(d, "t2i_1024"), theirs(d, "edit2_1024")
    rows = []

    def bar(name, value, limit, fmt, at_least=False):
        if value is None:
            rows.append(f"  ?    {name}: not measured")
        else:
            ok = value >= limit if at_least else value <= limit
            rows.append(f"  {'PASS' if ok else 'FAIL'} {name}: {fmt(value)} "
                        f"(bar {'≥' if at_least else '≤'} {fmt(limit)})")

    def ratio(a, b, k):  # None where either side was not measured
        x, y = (a or {}).get(k), (b or {}).get(k)
        return x / y if x is not None and y else None
    bar("warm 1024² t2i, ours / diffusers", ratio(ours_t2i, d_t2i, "total_ms"), 1.0, lambda x: f"{x:.2f}×")
    bar("  stretch", ratio(ours_t2i, d_t2i, "total_ms"), 0.7, lambda x: f"{x:.2f}×")
    bar("warm 2-reference edit, ours / diffusers", ratio(ours_edit, d_edit, "total_ms"), 1.0, lambda x: f"{x:.2f}×")
    # Each step's mean over the 1024² runs: a first step slower than the rest means work of an
    # earlier stage was still queued (stage times are synchronised since 2026-11-26 17:00).
    runs = [r for r in ours_doc.get("runs", [])
            if r.get("width") == 1024 and r.get("height") == 1024 and r.get("step_ms")]
    if runs:
        steps = [sum(r["step_ms"][i] for r in runs) / len(runs) for i in range(len(runs[0]["step_ms"]))]
        rows.append("  note: ours 1024² steps (ms): " + ", ".join(f"{x:.1f}" for x in steps))
    # The default attention kernel, and the same benches with the other kernels when measured.
    rows.append(f"  note: the attention kernel was {ours_doc.get('attention_kernel')}, "
                f"the text encoder's {ours_doc.get('text_attention_kernel')}")
    for env, t2i_name, edit_name in (("mma", "ours_bench_mma.json", "ours_bench_edit_mma.json"),
                                     ("wgmma", "ours_bench_wgmma.json", None)):
        doc = load(t2i_name)
        alt_t2i, alt_edit = ours_summary(doc, 0), edit_name and ours_summary(load(edit_name), 2)
        if doc:
            rows.append(f"  note: with FLUX2_KLEIN_ATTN={env} it was {doc.get('attention_kernel')}")
            bar(f"  with FLUX2_KLEIN_ATTN={env}: warm 1024² t2i", ratio(alt_t2i, d_t2i, "total_ms"), 1.0,
                lambda x: f"{x:.2f}×")
        if alt_edit:
            bar(f"  with FLUX2_KLEIN_ATTN={env}: warm edit", ratio(alt_edit, d_edit, "total_ms"), 1.0,
                lambda x: f"{x:.2f}×")
    bar("text encode, ours / diffusers", ratio(ours_t2i, d_t2i, "text_encode_ms"), 0.5, lambda x: f"{x:.2f}×")
    peak = ours_t2i and ours_t2i.get("peak") and ours_t2i["peak"] / 2**30
    bar("warm bench peak memory vs diffusers' peak", peak, (d_t2i or {}).get("peak_gib") or 0,
        lambda x: f"{x:.2f} GiB")
    def number(name):  # a file holding one number (seconds, GiB)
        try:
            return float(open(os.path.join(out, name)).read())
        except Exception:
            return None

    single_peak = number("ours_generate_peak_gib")
    bar("single generate 1024², peak device memory", single_peak, 12.0, lambda x: f"{x:.2f} GiB")
    bar("  stretch", single_peak, 10.0, lambda x: f"{x:.2f} GiB")
    cold_ours, cold_d = number("ours_cold_s"), number("diffusers_cold_s")
    bar("cold start 1024², ours / diffusers", cold_ours / cold_d if cold_ours and cold_d else None, 1.0,
        lambda x: f"{x:.2f}×")
    a, b = os.path.join(out, "ours_t2i_1024.png"), os.path.join(out, "diffusers_t2i_1024.png")
    p = psnr_db(*image_pair(a, b)) if os.path.exists(a) and os.path.exists(b) else None
    bar("1024² image, PSNR ours vs diffusers bf16", p, 30.0, lambda x: f"{x:.1f} dB", at_least=True)
    w = os.path.join(out, "ours_t2i_1024_mma.png")
    if os.path.exists(w) and os.path.exists(b):
        bar("  with FLUX2_KLEIN_ATTN=mma", psnr_db(*image_pair(w, b)), 30.0, lambda x: f"{x:.1f} dB",
            at_least=True)
    print("issue #7 bars measured by this run:")
    print("\n".join(rows))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-model": make_model, "refs": make_refs, "diffusers": diffusers_bench, "cold": cold,
     "image": image, "psnr": psnr, "verdict": verdict}[cmd](*args)
