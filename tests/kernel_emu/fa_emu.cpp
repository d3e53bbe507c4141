// src/cuda/kernels/flash_attn.cu compiled for the CPU: the kernel's own code (tiling, copies,
// swizzle, online softmax, epilogue) with the PTX helpers emulated (ptx_emu.hpp), launched as
// src/cuda/attention/ launches it (used by fa_selftest.cpp).
#include "ptx_emu.hpp"

#undef __shared__
#define __shared__
#define __launch_bounds__(...)
#define FLUX2_KERNEL_EMU 1
#define smem_chunks emu_smem_chunks  // the kernel's dynamic shared memory, defined below
#include FA_SOURCE
#ifdef FA_SM90_SOURCE  // the Hopper (wgmma) variant, appended as NVRTC gets it
#include FA_SM90_SOURCE
#define FA_HAS_SM90 1
#endif
#undef smem_chunks
Chunk16 emu_smem_chunks[256 * 1024 / sizeof(Chunk16)];

extern "C" int emu_flash(int d, int bf16, const u16* q, const u16* k, const u16* v, u16* o, int b,
                         int h, int sq, int sk, int dact, const long long* strides,
                         float scale_log2) {
    // KernelConfig::for_head_dim: (warps, m-tiles, keys per tile).
    const int nw = 4, mt = d == 128 ? 2 : 1;
    const int bm = 16 * mt * nw;
    const long long* s = strides;  // q, k, v, o: (batch, head, token)
    emu_smem = reinterpret_cast<unsigned char*>(emu_smem_chunks);
    Dim3 grid{(unsigned)((sq + bm - 1) / bm), (unsigned)h, (unsigned)b};
#define FA_CASE(DT, D, NW, MT, BN)                                                          \
    emu_launch(grid, NW * 32, [&] {                                                        \
        fa_fwd_##DT##_d##D##_w##NW##_m##MT##_n##BN(q, k, v, o, sq, sk, dact, s[0], s[1], s[2], \
                                                   s[3], s[4], s[5], s[6], s[7], s[8], s[9], \
                                                   s[10], s[11], scale_log2);              \
    });                                                                                    \
    return 0;
    if (bf16) {
        if (d == 16) { FA_CASE(bf16, 16, 4, 1, 64) }
        if (d == 32) { FA_CASE(bf16, 32, 4, 1, 64) }
        if (d == 64) { FA_CASE(bf16, 64, 4, 1, 64) }
        if (d == 128) { FA_CASE(bf16, 128, 4, 2, 64) }
        if (d == 256) { FA_CASE(bf16, 256, 4, 1, 32) }
    } else {
        if (d == 128) { FA_CASE(f16, 128, 4, 2, 64) }
        if (d == 32) { FA_CASE(f16, 32, 4, 1, 64) }
    }
    return 1;
}

// The causal variant (the text encoder's): D = 128, 64 or 16 (the tiny fixtures' head dim 8),
// as src/cuda/attention/ launches it with -DFA_CAUSAL. kv_valid: real keys; group: query heads per
// K/V head (h counts query heads).
FA_CAUSAL_KERNEL(bf16, true, 128, 4, 2, 64)
FA_CAUSAL_KERNEL(bf16, true, 64, 4, 1, 64)
FA_CAUSAL_KERNEL(bf16, true, 16, 4, 1, 64)
extern "C" int emu_flash_causal(int d, const u16* q, const u16* k, const u16* v, u16* o, int b,
                                int h, int sq, int sk, int dact, const long long* strides,
                                float scale_log2, int kv_valid, int group) {
    const long long* s = strides;
    emu_smem = reinterpret_cast<unsigned char*>(emu_smem_chunks);
    const int bm = d == 128 ? 128 : 64;
    Dim3 grid{(unsigned)((sq + bm - 1) / bm), (unsigned)h, (unsigned)b};
    // The three instances share one signature: pick one, launch it once.
    auto* kernel = d == 128 ? fa_causal_bf16_d128_w4_m2_n64
                   : d == 64 ? fa_causal_bf16_d64_w4_m1_n64
                   : d == 16 ? fa_causal_bf16_d16_w4_m1_n64
                             : nullptr;
    if (!kernel) return 1;
    emu_launch(grid, 128, [&] {
        kernel(q, k, v, o, sq, sk, dact, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9],
               s[10], s[11], scale_log2, kv_valid, group);
    });
    return 0;
}

#ifdef FA_HAS_SM90
// The Hopper variant (bf16, head dim 128), launched as src/cuda/attention/ launches it.
// bn: keys per tile, 64 (fa90_fwd_bf16_d128) or 128 (fa90_fwd_bf16_d128_n128).
extern "C" int emu_flash90(int bn, const u16* q, const u16* k, const u16* v, u16* o, int b, int h,
                           int sq, int sk, const long long* strides, float scale_log2) {
    const long long* s = strides;
    emu_smem = reinterpret_cast<unsigned char*>(emu_smem_chunks);
    Dim3 grid{(unsigned)((sq + 127) / 128), (unsigned)h, (unsigned)b};
    emu_launch(grid, 256, [&] {
        if (bn == 64)
            fa90_fwd_bf16_d128(q, k, v, o, sq, sk, 128, s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                               s[7], s[8], s[9], s[10], s[11], scale_log2);
        else
            fa90_fwd_bf16_d128_n128(q, k, v, o, sq, sk, 128, s[0], s[1], s[2], s[3], s[4], s[5],
                                    s[6], s[7], s[8], s[9], s[10], s[11], scale_log2);
    });
    return 0;
}
#endif
