"""Runs src/cuda/flash_attn.cu on the CPU (fa_emu.cpp: the kernel's own code, PTX helpers
emulated) against f32 attention on the same bf16/f16 inputs, for every head dim, both
layouts, ragged lengths and a head dim that is not a kernel size. With a second library (the
kernel of another revision, built the same way) it also requires bit-identical outputs.
Usage: check_flash.py LIB.so [OTHER.so]   (exit 1 on a failure)"""
import ctypes
import math
import sys

import torch

torch.manual_seed(0)
libs = [ctypes.CDLL(p) for p in sys.argv[1:]]
failures = []

CASES = [  # B, H, Sq, Sk, head dim, dtype, layout[+sink]
    (1, 2, 40, 40, 16, torch.bfloat16, "bhsd"),
    # Key 0 scores highest for every query, so the running max settles in the first tile and
    # the later tiles take the kernel's no-rescale path.
    (1, 2, 100, 400, 128, torch.bfloat16, "bhsd+sink"),
    (1, 2, 77, 77, 32, torch.bfloat16, "bhsd"),
    (1, 2, 150, 200, 64, torch.bfloat16, "bshd"),
    (1, 2, 200, 130, 128, torch.bfloat16, "bhsd"),  # 2 query blocks, 3 key tiles (last partial)
    (2, 1, 129, 64, 128, torch.bfloat16, "bshd"),   # one full key tile only
    (1, 1, 64, 200, 96, torch.bfloat16, "bshd"),    # D=96 runs in the D=128 instance
    (1, 2, 70, 100, 256, torch.bfloat16, "bhsd"),
    (1, 1, 33, 1, 8, torch.bfloat16, "bhsd"),
    (1, 2, 130, 190, 128, torch.float16, "bshd"),
]


def run(lib, q, k, v, d_kernel, scale):
    b, h, sq, dh = q.shape
    sk = k.shape[2]
    o = torch.empty(b, sq, h, dh, dtype=q.dtype).transpose(1, 2)  # [B,H,S,D] view, bshd memory
    strides = [s for t in (q, k, v, o) for s in t.stride()[:3]]
    arr = (ctypes.c_longlong * 12)(*strides)
    rc = lib.emu_flash(
        ctypes.c_int(d_kernel), ctypes.c_int(q.dtype == torch.bfloat16),
        *[ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, o)],
        ctypes.c_int(b), ctypes.c_int(h), ctypes.c_int(sq), ctypes.c_int(sk), ctypes.c_int(dh),
        arr, ctypes.c_float(scale * math.log2(math.e)))
    assert rc == 0, "no such kernel instance"
    return o


for (b, h, sq, sk, dh, dt, layout) in CASES:
    sink = layout.endswith("+sink")
    layout = layout.removesuffix("+sink")

    def mk(s):
        if layout == "bshd":
            return torch.randn(b, s, h, dh).to(dt).transpose(1, 2)
        return torch.randn(b, h, s, dh).to(dt)
    q, k, v = mk(sq), mk(sk), mk(sk)
    if sink:
        q = q.abs()
        k[:, :, 0] = (0.5 * torch.ones(dh)).to(dt)
    d_kernel = next(x for x in (16, 32, 64, 128, 256) if x >= dh)
    scale = 1 / math.sqrt(dh)
    ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, -1) @ v.float()
    outs = [run(lib, q, k, v, d_kernel, scale) for lib in libs]
    err = (outs[0].float() - ref).abs().max().item()
    ok = torch.isfinite(outs[0]).all().item() and err <= 1e-3 + 8e-3 * ref.abs().max().item()
    same = all(torch.equal(outs[0], other) for other in outs[1:])
    name = f"B={b} H={h} Sq={sq} Sk={sk} D={dh} {str(dt)[6:]} {layout}{'+sink' if sink else ''}"
    extra = "" if len(outs) == 1 else (", bit-identical to the other build" if same else ", DIFFERS from the other build")
    print(f"{'ok  ' if ok and same else 'FAIL'} flash {name:42s} max abs err {err:.2e}{extra}", flush=True)
    if not (ok and same):
        failures.append(name)
sys.exit(1 if failures else 0)
