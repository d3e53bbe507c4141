"""How sensitive is a random full-size klein-4B transformer to bf16 rounding? (CPU, diffusers)

    ~/.cache/flux2-klein-refenv/bin/python scripts/probes/bf16_sensitivity.py QK,MOD [QK,MOD ...]

For each recipe (q/k-norm scale QK, modulation weights ×MOD, otherwise gpu_bench.randomize_):
4 Euler steps of the transformer on 64 image tokens + 512 random text tokens; prints the
relative difference of the final latents (a) f32 vs f32 with the initial noise perturbed by
2^-9 relative, (b) bf16 vs f32. About 4 minutes per recipe on 2 cores. Used to choose the
recipe of `gpu_bench.py make-model` (see BENCHMARKS.md)."""
import sys, math, time, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), "..", "gpu"))
import gpu_bench
from diffusers import Flux2Transformer2DModel
torch.set_num_threads(2)
_, tr_cfg, _ = gpu_bench.klein4b_configs()
gpu_bench.device = lambda: "cpu"
def run(model, lat0, emb, dtype):
    m = model.to(dtype)
    x = lat0.to(dtype)
    e = emb.to(dtype)
    n = x.shape[1]
    img_ids = torch.zeros(n, 4); side = int(math.sqrt(n))
    img_ids[:, 1] = torch.arange(n) // side; img_ids[:, 2] = torch.arange(n) % side
    txt_ids = torch.zeros(e.shape[1], 4); txt_ids[:, 3] = torch.arange(e.shape[1])
    sig = [1.0, 0.75, 0.5, 0.25, 0.0]
    with torch.no_grad():
        for i in range(4):
            t = torch.full((1,), sig[i], dtype=dtype)
            v = m(hidden_states=x, encoder_hidden_states=e, timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
            x = (x.float() + (sig[i + 1] - sig[i]) * v.float()).to(dtype)
    return x.float()
def rel(a, b): return float((a - b).norm() / b.norm())
for arg in sys.argv[1:]:
    qk, mod = (float(v) for v in arg.split(","))
    torch.set_default_dtype(torch.float32)
    tr = Flux2Transformer2DModel(**tr_cfg).eval()
    gpu_bench.randomize_(tr, 2, qk_scale=qk)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "modulation" in name:
                p.mul_(mod)
    g = torch.Generator().manual_seed(0)
    lat0 = torch.randn(1, 64, 128, generator=g)
    emb = torch.randn(1, 512, 7680, generator=g)
    t0 = time.time()
    ref = run(tr, lat0, emb, torch.float32)
    pert = run(tr, lat0 * (1 + 2**-9 * torch.randn(lat0.shape, generator=g)), emb, torch.float32)
    print(f"qk {qk} mod {mod}: f32 vs f32(noise perturbed 2^-9): rel {rel(pert, ref):.3e}  ({time.time()-t0:.0f}s)", flush=True)
    b = run(tr, lat0, emb, torch.bfloat16)
    print(f"qk {qk} mod {mod}: bf16 vs f32: rel {rel(b, ref):.3e}  ({time.time()-t0:.0f}s)", flush=True)
