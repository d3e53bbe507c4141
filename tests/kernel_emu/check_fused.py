"""Runs the kernels of src/cuda/kernels/fused.cu on the CPU (fused_emu.cpp + cuda_cpu.hpp, launched as
src/cuda/fused/ launches them) against PyTorch's bf16 ops, the ones diffusers runs, or an explicit f32
formula where the kernel documents candle's arithmetic. Catches indexing, stride and
synchronisation mistakes before a GPU run. Usage: check_fused.py LIB.so  (exit 1 on a failure)
"""
import ctypes
import os
import sys

import torch
import torch.nn.functional as F

torch.manual_seed(0)
lib = ctypes.CDLL(sys.argv[1])
P = ctypes.c_void_p
I32, I64, F32 = ctypes.c_int, ctypes.c_longlong, ctypes.c_float
failures = []


def ptr(t):
    return P(t.data_ptr())


def bf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


def check(name, got, want, max_ulps=1, max_frac=0.0, rel_tol=None):
    """got == want, or at most max_ulps bf16 steps apart in at most max_frac of the elements.
    With rel_tol a differing element may instead be off by up to rel_tol * max|want| (for
    outputs with cancellation, e.g. RoPE, where a 1-ulp input difference moves a small result
    by several ulps)."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    g = got.contiguous().view(torch.int16).to(torch.int32)
    w = want.contiguous().view(torch.int16).to(torch.int32)
    # bf16 bit patterns of same-sign values are ordered: the difference counts ulps.
    ulps = (g - w).abs()
    ulps[(g < 0) != (w < 0)] = 1 << 16  # a sign difference is never "one ulp"
    ulps[(got == 0) & (want == 0)] = 0
    worst, frac = int(ulps.max()), float((ulps > 0).float().mean())
    ok = worst <= max_ulps and frac <= max_frac
    if rel_tol is not None:  # each element within max_ulps, or within rel_tol of the scale
        near = (got.float() - want.float()).abs() <= rel_tol * want.float().abs().max()
        ok = bool(((ulps <= max_ulps) | near).all()) and frac <= max_frac
    print(f"{'ok  ' if ok else 'FAIL'} {name:42s} max {worst} ulp, {100 * frac:.3f} % differ")
    if os.environ.get("CHECK_FUSED_SHOW") and worst > 0:
        i = int(ulps.flatten().argmax())
        print(f"     worst element {i}: got {float(got.flatten()[i])}, want {float(want.flatten()[i])}")
        if rel_tol is not None:
            for i in torch.nonzero(~((ulps <= max_ulps) | near).flatten()).flatten()[:5].tolist():
                print(f"     outside: element {i}: got {float(got.flatten()[i])}, want {float(want.flatten()[i])}")
    if not ok:
        failures.append(name)


def swiglu():
    # f % 8 == 0 with 16-byte aligned rows takes the 8-wide path; the others the scalar one.
    for rows, f, pad, offset in ((37, 304, 8, 0), (37, 300, 6, 0), (9, 304, 8, 1)):
        wide = bf(rows * (2 * f + pad) + offset)[offset:].view(rows, 2 * f + pad)
        u = wide[:, : 2 * f]
        out = torch.empty(rows, f, dtype=torch.bfloat16)
        lib.emu_swiglu(ptr(wide), ptr(wide), ptr(out), I32(0), I32(f), I64(2 * f + pad), I64(rows))
        check(f"swiglu_bf16 (F={f}, row stride {2 * f + pad}, offset {offset})", out,
              F.silu(u[:, :f]) * u[:, f:], max_frac=0.002)
    # The single-stream block's cat([attention, swiglu]) in one pass.
    rows, f, d = 37, 304, 96
    wide = bf(rows * (2 * f + 8)).view(rows, 2 * f + 8)
    u, prefix = wide[:, : 2 * f], bf(rows, d)
    out = torch.empty(rows, d + f, dtype=torch.bfloat16)
    lib.emu_swiglu(ptr(wide), ptr(prefix), ptr(out), I32(d), I32(f), I64(2 * f + 8), I64(rows))
    check(f"swiglu_bf16 with a prefix (D={d}, F={f})", out,
          torch.cat([prefix, F.silu(u[:, :f]) * u[:, f:]], -1), max_frac=0.002)


def row_wise():
    for d in (3072 - 32, 3072 - 36):  # 8-wide and scalar paths
        b, n = 2, 9
        x, y = bf(b, n, d, scale=2.0), bf(b, n, d)
        scale, shift, gate = bf(b, d, scale=0.3), bf(b, d, scale=0.3), bf(b, d)
        out = torch.empty(b, n, d, dtype=torch.bfloat16)
        lib.emu_row_wise(I32(0), ptr(x), ptr(scale), ptr(shift), ptr(out), I64(b), I64(n), I32(d), F32(0))
        check(f"modulate_bf16 (D={d})", out, (1 + scale[:, None]) * x + shift[:, None])
        lib.emu_row_wise(I32(1), ptr(x), ptr(scale), ptr(shift), ptr(out), I64(b), I64(n), I32(d), F32(1e-6))
        ln = F.layer_norm(x, (d,), eps=1e-6)
        check(f"layernorm_modulate_bf16 (D={d})", out, (1 + scale[:, None]) * ln + shift[:, None], max_frac=0.01)
        lib.emu_row_wise(I32(2), ptr(x), ptr(y), ptr(gate), ptr(out), I64(b), I64(n), I32(d), F32(0))
        check(f"gated_residual_bf16 (D={d})", out, x + gate[:, None] * y)


def rope_tables(s, d):
    ang = torch.randn(s, d // 2) * 3
    return ang.cos().contiguous(), ang.sin().contiguous()


def rope_reference(x, cos, sin):
    """diffusers' apply_rotary_emb (interleaved pairs, f32 math, one rounding)."""
    c = cos.repeat_interleave(2, -1)[None, :, None, :]
    s = sin.repeat_interleave(2, -1)[None, :, None, :]
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-xi, xr], -1).flatten(-2)
    return (x.float() * c + rot * s).to(torch.bfloat16)


def rope():
    b, s, h, d = 2, 11, 3, 64
    x = bf(b, s, h, d)
    cos, sin = rope_tables(s, d)
    out = torch.empty_like(x)
    pairs = b * s * h * d // 2
    lib.emu_rope_bshd(ptr(x), ptr(cos), ptr(sin), ptr(out), I64(pairs), I32(s), I32(h), I32(d // 2))
    check("rope_bshd_bf16", out, rope_reference(x, cos, sin))


def rmsnorm_rope():
    for d in (128, 256, 96):  # 8-byte path with one and two chunks per lane; scalar path
        b, h, s0, s1, eps = 2, 3, 5, 13, 1e-6
        # Segment views into fused projections, as the transformer passes them: [B, S, 3, H, D]
        # (q, k, v of the text tokens) and [B, S, H, 5, D] (a wider single-block projection).
        p0 = bf(b, s0, 3, h, d, scale=2.0)
        p1 = bf(b, s1, h, 5, d, scale=2.0)
        x0, x1 = p0[:, :, 1], p1[:, :, :, 2]
        w0, w1 = torch.rand(d) + 0.5, torch.rand(d) + 0.5
        cos, sin = rope_tables(s0 + s1, d)
        out = torch.empty(b, s0 + s1, h, d, dtype=torch.bfloat16)
        strides = (I64 * 6)(*x0.stride()[:3], *x1.stride()[:3])
        rows = b * (s0 + s1) * h
        lib.emu_rmsnorm_rope(
            P(x0.data_ptr()), P(x1.data_ptr()), ptr(w0), ptr(w1), ptr(cos), ptr(sin), ptr(out),
            I64(rows), I32(s0), I32(s0 + s1), I32(h), I32(d), strides, F32(eps))

        def rms(x, w):  # candle's rms_norm: f32, weight in f32, one rounding
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(torch.bfloat16)

        normed = torch.cat([rms(x0, w0), rms(x1, w1)], 1)
        check(f"rmsnorm_rope_bf16 (D={d}, two strided segments)", out, rope_reference(normed, cos, sin),
              max_frac=0.01, rel_tol=2.0 ** -8)


def group_norm():
    for hh, ww in ((9, 13), (8, 16), (64, 96)):  # H·W not a multiple of 8 (scalar path), 8-wide
        b, c, g, eps = 2, 64, 32, 1e-6
        x = bf(b, c, hh, ww, scale=3.0) + 1.5
        w, bias = torch.rand(c) + 0.5, torch.randn(c) * 0.1
        out = torch.empty_like(x)
        for silu in (0, 1):
            lib.emu_group_norm(ptr(x), ptr(w), ptr(bias), ptr(out), I32(b), I32(c), I64(hh * ww), I32(g),
                               F32(eps), I32(silu))
            want = F.group_norm(x.float(), g, w, bias, eps).to(torch.bfloat16)
            if silu:
                want = F.silu(want)
            # (x - mean)·rstd·w + bias cancels to near 0 for some elements, where a last-bit
            # difference in the statistics is several ulps of the tiny result: rel_tol. With
            # SiLU a 1-ulp difference of the rounded norm can become 2 ulps of silu's output
            # (an ulp of the input near 0.5 is two ulps of the output near 0.3).
            check(f"gn_partial/finalize/apply_bf16 ({hh}x{ww}, silu={silu})", out, want,
                  max_ulps=1 + silu, max_frac=0.01, rel_tol=1e-4)


def channel_bias():
    for hh, ww in ((9, 13), (8, 16)):  # scalar and 8-wide paths
        b, c = 2, 24
        x, bias = bf(b, c, hh, ww, scale=3.0), bf(c)
        out = torch.empty_like(x)
        lib.emu_channel_bias(ptr(x), ptr(bias), ptr(out), I32(b), I32(c), I64(hh * ww))
        check(f"channel_bias_bf16 ({hh}x{ww})", out, x + bias[None, :, None, None])


def qwen3():
    """The text encoder's kernels against transformers' Qwen3 ops in bf16."""
    for n in (512 * 96, 37 * 300 + 3):  # 8-wide path; odd length: scalar path
        gate, up = bf(n, scale=2.0), bf(n)
        out = torch.empty(n, dtype=torch.bfloat16)
        lib.emu_silu_mul(ptr(gate), ptr(up), ptr(out), I64(n))
        check(f"silu_mul_bf16 (n={n})", out, F.silu(gate) * up, max_frac=0.002)
    eps = 1e-6
    for rows, d in ((37, 2560), (300, 128), (13, 8)):  # hidden states, q/k heads, tiny heads
        x, w = bf(rows, d, scale=3.0), (1 + bf(d, scale=0.2).float()).to(torch.bfloat16)
        out = torch.empty(rows, d, dtype=torch.bfloat16)
        lib.emu_rmsnorm_scale(ptr(x), ptr(w), ptr(out), I64(rows), I32(d), F32(eps))
        h = x.float()
        want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16)
        check(f"rmsnorm_scale_bf16 (rows={rows}, D={d})", out, want, max_frac=0.002)


for case in (channel_bias, swiglu, row_wise, rope, rmsnorm_rope, group_norm, qwen3):
    case()
sys.exit(1 if failures else 0)
