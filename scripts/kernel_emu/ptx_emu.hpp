// CPU versions of the PTX helpers of src/cuda/flash_attn.cu (used with FLUX2_KERNEL_EMU and
// cuda_cpu.hpp). ldmatrix and mma.sync are warp-collective: each lane publishes its operand in
// the warp's slots, the warp meets at a barrier, and each lane assembles its result from the
// fragment layouts of the PTX ISA (m8n8 .b16 matrices; mma.m16n8k16 .row.col with
// groupID = lane / 4, threadID_in_group = lane % 4). cp.async copies at once (so a missing
// wait cannot show); ex2.approx is exp2f.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_cpu.hpp"

typedef unsigned short u16;
typedef unsigned int u32;

// The dynamic shared memory of the running block (flash_attn.cu's `smem_chunks`; set by the
// launcher).
inline unsigned char* emu_smem;

struct EmuWarpData {
    u32 addr[32];
    u32 a[32][4];
    u32 b[32][2];
};
inline EmuWarpData emu_warp_data[32];  // per warp of the block

inline EmuWarpData& emu_wd() { return emu_warp_data[threadIdx.x / 32]; }
inline void emu_warp_sync() { emu_warp->bar.arrive_and_wait(); }

static inline u32 smem_u32(const void* p) {
    return (u32)((const unsigned char*)p - emu_smem);
}

static inline void cp_async16(u32 dst, const void* src, bool valid) {
    if (valid) std::memcpy(emu_smem + dst, src, 16);
    else std::memset(emu_smem + dst, 0, 16);
}
static inline void cp_async_commit() {}
static inline void cp_async_wait_all() {}

static inline u16 emu_smem_b16(u32 byte_addr) {
    u16 v;
    std::memcpy(&v, emu_smem + byte_addr, 2);
    return v;
}

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane t receives, from
// matrix i, row t/4 elements 2(t%4), 2(t%4)+1 (.trans: column t/4, rows 2(t%4), 2(t%4)+1).
template <bool TRANS>
static inline void emu_ldsm_x4(u32 (&r)[4], u32 addr) {
    const int lane = threadIdx.x & 31;
    emu_wd().addr[lane] = addr;
    emu_warp_sync();
    for (int i = 0; i < 4; ++i) {
        u16 lo, hi;
        if (!TRANS) {
            const u32 row = emu_wd().addr[8 * i + lane / 4];
            lo = emu_smem_b16(row + 2 * (2 * (lane % 4)));
            hi = emu_smem_b16(row + 2 * (2 * (lane % 4) + 1));
        } else {
            lo = emu_smem_b16(emu_wd().addr[8 * i + 2 * (lane % 4)] + 2 * (lane / 4));
            hi = emu_smem_b16(emu_wd().addr[8 * i + 2 * (lane % 4) + 1] + 2 * (lane / 4));
        }
        r[i] = (u32)lo | ((u32)hi << 16);
    }
    emu_warp_sync();
}
static inline void ldsm_x4(u32 (&r)[4], u32 addr) { emu_ldsm_x4<false>(r, addr); }
static inline void ldsm_x4_t(u32 (&r)[4], u32 addr) { emu_ldsm_x4<true>(r, addr); }

static inline float emu_bf16(u16 v) {
    u32 u = (u32)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline float emu_f16(u16 v) {
    _Float16 h;
    std::memcpy(&h, &v, 2);
    return (float)h;
}
template <bool BF16>
static inline float emu_half(u32 word, int hi) {
    const u16 v = hi ? (u16)(word >> 16) : (u16)(word & 0xffff);
    return BF16 ? emu_bf16(v) : emu_f16(v);
}

// c += a * b: a 16x16 (rows gid, gid+8; columns 2*tig.. and 2*tig+8..), b 16x8 (k rows
// 2*tig.., 2*tig+8..; column gid), c 16x8 (rows gid, gid+8; columns 2*tig, 2*tig+1), f32.
template <bool BF16>
static inline void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    const int lane = threadIdx.x & 31;
    EmuWarpData& w = emu_wd();
    for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
    w.b[lane][0] = b0;
    w.b[lane][1] = b1;
    emu_warp_sync();
    auto A = [&](int row, int k) {  // element (row, k) of the 16x16 A
        const int g = row % 8, t = (k % 8) / 2;
        const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return emu_half<BF16>(w.a[4 * g + t][reg], k % 2);
    };
    auto B = [&](int k, int col) {  // element (k, col) of the 16x8 B
        const int t = (k % 8) / 2;
        return emu_half<BF16>(w.b[4 * col + t][k >= 8 ? 1 : 0], k % 2);
    };
    const int gid = lane / 4, tig = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = gid + (e >= 2 ? 8 : 0), col = 2 * tig + (e % 2);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc = std::fma(A(row, k), B(k, col), acc);
        c[e] = acc;
    }
    emu_warp_sync();
}

static inline u16 emu_f2bf(float f) {
    u32 u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
static inline u16 emu_f2h(float f) {
    _Float16 h = (_Float16)f;
    u16 v;
    std::memcpy(&v, &h, 2);
    return v;
}
template <bool BF16>
static inline u32 pack2(float lo, float hi) {
    return BF16 ? ((u32)emu_f2bf(hi) << 16) | emu_f2bf(lo) : ((u32)emu_f2h(hi) << 16) | emu_f2h(lo);
}

static inline float fast_exp2(float x) { return std::exp2(x); }
