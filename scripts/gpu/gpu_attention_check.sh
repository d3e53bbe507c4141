#!/usr/bin/env bash
# gpu_attention_check.sh — checks of our fused attention kernel
# (src/cuda/kernels/flash_attn.cu) on a GPU machine that has no Rust toolchain.
#
#   scripts/gpu/gpu_attention_check.sh rust TEST_EXE  run the prebuilt `tests/cuda_gpu`
#                                                     executable (correctness vs the naive
#                                                     path + timings), with the CUDA 13
#                                                     libraries on the library path
#   scripts/gpu/gpu_attention_check.sh kernel         kernel-only check without Rust: compiles
#                                                     the .cu with NVRTC (through ctypes,
#                                                     exactly like src/cuda/attention/),
#                                                     launches it on torch tensors and compares
#                                                     with an f32 reference and with torch's
#                                                     SDPA; benchmarks the D=128 tilings
#
# Needs python3 with torch (CUDA 13 build) for the library path and for `kernel`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mode="${1:-kernel}"

# The CUDA 13 runtime libraries (cudart, cublas, curand, nvrtc + nvrtc-builtins) that PyTorch's
# nvidia-* wheels bring.
NV_LIB="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${NV_LIB:+$NV_LIB:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

case "$mode" in
rust)
  exe="${2:?usage: $0 rust PATH/TO/cuda_gpu-<hash>}"
  chmod +x "$exe"
  exec "$exe" --test-threads=1 --nocapture
  ;;
kernel)
  exec python3 - "$HERE/src/cuda/kernels/flash_attn.cu" "$NV_LIB" <<'PY'
import ctypes, math, os, sys, time
import torch

src_path, nv_lib = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
dev = torch.device("cuda")
torch.zeros(1, device=dev)  # create the primary context and make it current
print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)

# ---- NVRTC compile (same options as src/cuda/attention/, plus the benchmark variants) ----
def find_lib(names):
    for n in names:
        for d in [nv_lib, ""]:
            p = os.path.join(d, n) if d else n
            try:
                return ctypes.CDLL(p), p
            except OSError:
                pass
    raise SystemExit(f"none of {names} found")

nvrtc, nvrtc_path = find_lib(["libnvrtc.so.13", "libnvrtc.so"])
ver = (ctypes.c_int(), ctypes.c_int()); nvrtc.nvrtcVersion(ctypes.byref(ver[0]), ctypes.byref(ver[1]))
print("nvrtc", nvrtc_path, f"{ver[0].value}.{ver[1].value}")
major, minor = torch.cuda.get_device_capability(0)
src = open(src_path, "rb").read()
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"flash_attn.cu", 0, None, None) == 0
opts = [f"--gpu-architecture=compute_{major}{minor}".encode(), b"-DFA_BENCH_VARIANTS"]
t0 = time.time()
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t(); nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value); nvrtc.nvrtcGetProgramLog(prog, log)
print(f"nvrtc compile rc={rc} in {time.time() - t0:.2f}s", log.value.decode()[:2000])
assert rc == 0
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n)); ptx = ctypes.create_string_buffer(n.value)
nvrtc.nvrtcGetPTX(prog, ptx)

cuda = ctypes.CDLL("libcuda.so.1")
def ck(r, what):
    if r != 0:
        s = ctypes.c_char_p(); cuda.cuGetErrorString(r, ctypes.byref(s))
        raise RuntimeError(f"{what}: {r} {s.value}")
mod = ctypes.c_void_p()
ck(cuda.cuModuleLoadData(ctypes.byref(mod), ptx), "cuModuleLoadData")

funcs = {}
def get_func(name, smem):
    if name not in funcs:
        f = ctypes.c_void_p()
        ck(cuda.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), name)
        ck(cuda.cuFuncSetAttribute(f, 8, smem), "set max dyn smem")  # MAX_DYNAMIC_SHARED_SIZE_BYTES
        regs = ctypes.c_int(); cuda.cuFuncGetAttribute(ctypes.byref(regs), 4, f)  # NUM_REGS
        occ = ctypes.c_int()
        nw = int(name.split("_w")[1].split("_")[0])
        cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(occ), f, nw * 32, ctypes.c_size_t(smem))
        print(f"  {name}: {regs.value} regs, {smem} B smem, {occ.value} blocks/SM")
        funcs[name] = f
    return funcs[name]

DEFAULT = {16: (4, 1, 64), 32: (4, 1, 64), 64: (4, 1, 64), 128: (4, 2, 64), 256: (4, 1, 32)}

def fa(q, k, v, scale, cfg=None, out_bshd=False):
    """q,k,v: [B,H,S,D] views (any strides with last stride 1)."""
    B, H, Sq, Dh = q.shape
    Sk = k.shape[2]
    Dk = next(d for d in (16, 32, 64, 128, 256) if d >= Dh)
    nw, mt, bn = cfg or DEFAULT[Dk]
    dt = "bf16" if q.dtype == torch.bfloat16 else "f16"
    name = f"fa_fwd_{dt}_d{Dk}_w{nw}_m{mt}_n{bn}"
    bm = 16 * mt * nw
    smem = (bm + 4 * bn) * Dk * 2
    f = get_func(name, smem)
    o = torch.empty(B, Sq, H, Dh, dtype=q.dtype, device=dev).transpose(1, 2) if out_bshd \
        else torch.empty(B, H, Sq, Dh, dtype=q.dtype, device=dev)
    for t in (q, k, v, o):
        assert t.stride(3) == 1 and all(s % 8 == 0 for s in t.stride()[:3])
    vals = [ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()), ctypes.c_void_p(v.data_ptr()),
            ctypes.c_void_p(o.data_ptr()), ctypes.c_int(Sq), ctypes.c_int(Sk), ctypes.c_int(Dh)]
    for t in (q, k, v, o):
        vals += [ctypes.c_longlong(t.stride(0)), ctypes.c_longlong(t.stride(1)), ctypes.c_longlong(t.stride(2))]
    vals.append(ctypes.c_float(scale * math.log2(math.e)))
    args = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(x) for x in vals])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    ck(cuda.cuLaunchKernel(f, (Sq + bm - 1) // bm, H, B, nw * 32, 1, 1, smem, stream, args, None), "launch " + name)
    return o

def ref(q, k, v, scale):
    out = []
    for b in range(q.shape[0]):  # per batch keeps the f32 score matrix small
        s = torch.matmul(q[b].float(), k[b].float().transpose(-1, -2)) * scale
        out.append(torch.matmul(torch.softmax(s, -1), v[b].float()))
    return torch.stack(out)

cases = [  # B, H, Sq, Sk, D, dtype, layout, q-gain
    (1, 2, 40, 40, 16, torch.bfloat16, "bhsd", 1.0),
    (1, 3, 77, 77, 32, torch.bfloat16, "bhsd", 1.0),
    (2, 24, 600, 600, 128, torch.bfloat16, "bhsd", 1.0),
    (1, 24, 4608, 4608, 128, torch.bfloat16, "bhsd", 1.0),
    (1, 4, 300, 1000, 64, torch.bfloat16, "bhsd", 1.0),
    (1, 4, 1000, 129, 128, torch.bfloat16, "bshd", 1.0),
    (2, 3, 130, 257, 40, torch.bfloat16, "bhsd", 1.0),
    (1, 2, 65, 70, 96, torch.bfloat16, "bshd", 1.0),
    (1, 2, 100, 50, 256, torch.bfloat16, "bhsd", 1.0),
    (1, 2, 33, 1, 8, torch.bfloat16, "bhsd", 1.0),
    (1, 8, 700, 700, 128, torch.bfloat16, "bhsd", 8.0),
    (1, 3, 77, 200, 32, torch.float16, "bhsd", 1.0),
    (2, 24, 600, 600, 128, torch.float16, "bshd", 1.0),
]
print("correctness (error vs f32 math on the same rounded inputs; torch SDPA's error for scale):")
worst = 0.0
ok_all = True
for (B, H, Sq, Sk, D, dtp, lay, gain) in cases:
    def mk(S):
        if lay == "bshd":
            return torch.randn(B, S, H, D, device=dev).to(dtp).transpose(1, 2)
        return torch.randn(B, H, S, D, device=dev).to(dtp)
    q, k, v = (mk(Sq) * gain).to(dtp), mk(Sk), mk(Sk)
    if lay == "bshd":
        q = (torch.randn(B, Sq, H, D, device=dev) * gain).to(dtp).transpose(1, 2)
    scale = 1.0 / math.sqrt(D)
    o = fa(q, k, v, scale, out_bshd=(lay == "bshd"))
    torch.cuda.synchronize()
    r = ref(q, k, v, scale)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).float()
    err = (o.float() - r).abs().max().item()
    err_sdpa = (sd - r).abs().max().item()
    rel = err / r.abs().max().item()
    finite = torch.isfinite(o).all().item()
    ok = finite and err <= max(2.5 * err_sdpa, 1e-3) + 4e-3 * r.abs().max().item()
    ok_all &= ok
    worst = max(worst, rel)
    print(f"  {'OK ' if ok else 'BAD'} B={B} H={H} Sq={Sq} Sk={Sk} D={D} {str(dtp)[6:]} {lay} gain={gain}: "
          f"max abs err {err:.3e} (rel {rel:.2e}), sdpa {err_sdpa:.3e}", flush=True)
print("ALL CORRECT" if ok_all else "SOME CASES FAILED", f"(worst rel err {worst:.2e})")

# ---- timing (1, 24, 4608, 128) ----
B, H, S, D = 1, 24, 4608, 128
q, k, v = (torch.randn(B, H, S, D, device=dev).to(torch.bfloat16) for _ in range(3))
scale = 1 / math.sqrt(D)
flops = 4 * B * H * S * S * D
def bench(fn, n=20):
    fn(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n
print(f"timing B={B} H={H} S={S} D={D} bf16 (mean of 20, warm):")
r = ref(q, k, v, scale)
for cfg in [(4, 2, 64), (4, 1, 64), (8, 1, 64), (4, 2, 32)]:
    ms = bench(lambda: fa(q, k, v, scale, cfg))
    err = (fa(q, k, v, scale, cfg).float() - r).abs().max().item()
    print(f"  ours w{cfg[0]} m{cfg[1]} n{cfg[2]}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  (max abs err {err:.2e})", flush=True)
from torch.nn.attention import sdpa_kernel, SDPBackend
for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    try:
        with sdpa_kernel(be):
            ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
        print(f"  torch sdpa {be.name}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s")
    except Exception as e:
        print(f"  torch sdpa {be.name}: unavailable ({str(e)[:80]})")
def naive():
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, -1), v)
print(f"  torch naive bf16 (matmul, softmax, matmul): {bench(naive):.3f} ms", flush=True)

# ---- the Hopper variant (flash_attn_sm90.cu appended: wgmma, bf16, D = 128), compute_90a ----
# Last, because a faulting kernel leaves the CUDA context unusable.
if (major, minor) != (9, 0):
    print("fa90 (wgmma): skipped, needs compute capability 9.0"); sys.exit(0)
def smem_for(bn):
    return (128 + 4 * bn) * 128 * 2 + 1024
def load90(extra=(), name=b"fa90_fwd_bf16_d128", bn=64):
    prog90 = ctypes.c_void_p()
    src90 = src + open(src_path.replace("flash_attn.cu", "flash_attn_sm90.cu"), "rb").read()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog90), src90, b"flash_attn_sm90.cu", 0, None, None) == 0
    opts90 = [b"--gpu-architecture=compute_90a", b"-DFA_ONLY_D=0", b"-DFA_ONLY_BF16", *extra]
    rc = nvrtc.nvrtcCompileProgram(prog90, len(opts90), (ctypes.c_char_p * len(opts90))(*opts90))
    nvrtc.nvrtcGetProgramLogSize(prog90, ctypes.byref(n)); log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog90, log)
    print(f"fa90 {[o.decode() for o in extra]} nvrtc compile rc={rc}", log.value.decode()[:2000])
    assert rc == 0
    nvrtc.nvrtcGetPTXSize(prog90, ctypes.byref(n)); ptx90 = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetPTX(prog90, ptx90)
    mod90 = ctypes.c_void_p()
    ck(cuda.cuModuleLoadData(ctypes.byref(mod90), ptx90), "cuModuleLoadData fa90")
    f = ctypes.c_void_p()
    ck(cuda.cuModuleGetFunction(ctypes.byref(f), mod90, name), name.decode())
    ck(cuda.cuFuncSetAttribute(f, 8, smem_for(bn)), "set max dyn smem fa90")
    regs = ctypes.c_int(); cuda.cuFuncGetAttribute(ctypes.byref(regs), 4, f)
    occ = ctypes.c_int()
    cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(occ), f, 256, ctypes.c_size_t(smem_for(bn)))
    print(f"  {name.decode()}: {regs.value} regs, {smem_for(bn)} B smem, {occ.value} blocks/SM", flush=True)
    return f
f90 = load90()
f90_n128 = load90(name=b"fa90_fwd_bf16_d128_n128", bn=128)

def fa90(q, k, v, scale, out_bshd=False, bn=64):
    B, H, Sq, Dh = q.shape
    assert Dh == 128 and q.dtype == torch.bfloat16
    o = torch.empty(B, Sq, H, Dh, dtype=q.dtype, device=dev).transpose(1, 2) if out_bshd \
        else torch.empty(B, H, Sq, Dh, dtype=q.dtype, device=dev)
    vals = [ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()), ctypes.c_void_p(v.data_ptr()),
            ctypes.c_void_p(o.data_ptr()), ctypes.c_int(Sq), ctypes.c_int(k.shape[2]), ctypes.c_int(Dh)]
    for t in (q, k, v, o):
        vals += [ctypes.c_longlong(t.stride(0)), ctypes.c_longlong(t.stride(1)), ctypes.c_longlong(t.stride(2))]
    vals.append(ctypes.c_float(scale * math.log2(math.e)))
    args = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(x) for x in vals])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    f = f90 if bn == 64 else f90_n128
    ck(cuda.cuLaunchKernel(f, (Sq + 127) // 128, H, B, 256, 1, 1, smem_for(bn), stream, args, None), "launch fa90")
    return o

print("fa90 correctness (the D = 128 bf16 cases above):")
ok90 = True
for (B, H, Sq, Sk, D, dtp, lay, gain) in cases + [(1, 2, 5, 1, 128, torch.bfloat16, "bhsd", 1.0)]:
    if D != 128 or dtp != torch.bfloat16:
        continue
    mk = lambda S, g=1.0: ((torch.randn(B, S, H, D, device=dev) * g).to(dtp).transpose(1, 2) if lay == "bshd"
                           else (torch.randn(B, H, S, D, device=dev) * g).to(dtp))
    q, k, v = mk(Sq, gain), mk(Sk), mk(Sk)
    scale = 1.0 / math.sqrt(D)
    r = ref(q, k, v, scale)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).float()
    err_sdpa = (sd - r).abs().max().item()
    for bn in (64, 128):
        o = fa90(q, k, v, scale, out_bshd=(lay == "bshd"), bn=bn); torch.cuda.synchronize()
        err = (o.float() - r).abs().max().item()
        ok = torch.isfinite(o).all().item() and err <= max(2.5 * err_sdpa, 1e-3) + 4e-3 * r.abs().max().item()
        ok90 &= ok
        print(f"  {'OK ' if ok else 'BAD'} fa90 n{bn} B={B} H={H} Sq={Sq} Sk={Sk} {lay} gain={gain}: max abs err {err:.3e}, sdpa {err_sdpa:.3e}", flush=True)
print("FA90 ALL CORRECT" if ok90 else "FA90 SOME CASES FAILED")
if not ok90:
    # The one reading of the PTX ISA the CPU emulation cannot settle: which descriptor offset
    # of the N-major V operand steps along N and which along K. Try the other one.
    f90 = load90((b"-DFA90_V_OFFSETS_SWAPPED",))
    B, H, S, D = 1, 4, 300, 128
    q, k, v = (torch.randn(B, H, S, D, device=dev).to(torch.bfloat16) for _ in range(3))
    scale = 1.0 / math.sqrt(D)
    err = (fa90(q, k, v, scale).float() - ref(q, k, v, scale)).abs().max().item()
    print(f"  fa90 with FA90_V_OFFSETS_SWAPPED: max abs err {err:.3e} "
          f"({'CORRECT: swap the V descriptor offsets' if err < 2e-2 else 'also wrong'})", flush=True)
    sys.exit(0)
for S in (4608, 10514):  # 1024² text-to-image; the 2-reference edit
    q, k, v = (torch.randn(1, 24, S, 128, device=dev).to(torch.bfloat16) for _ in range(3))
    fl = 4 * 24 * S * S * 128
    ms90 = bench(lambda: fa90(q, k, v, scale))
    ms90b = bench(lambda: fa90(q, k, v, scale, bn=128))
    ms = bench(lambda: fa(q, k, v, scale))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        msf = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
    print(f"  S={S}: fa90 {ms90:.3f} ms ({fl / ms90 / 1e9:.0f} TFLOP/s), fa90 n128 {ms90b:.3f} ms "
          f"({fl / ms90b / 1e9:.0f} TFLOP/s), ours mma.sync {ms:.3f} ms, torch FA2 {msf:.3f} ms", flush=True)
PY
  ;;
*)
  echo "usage: $0 kernel | rust TEST_EXE" >&2; exit 64 ;;
esac
