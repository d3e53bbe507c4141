// CPU versions of the PTX helpers of src/cuda/kernels/flash_attn.cu (used with FLUX2_KERNEL_EMU and
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

// ---- wgmma (src/cuda/kernels/flash_attn_sm90.cu), from the PTX ISA's definitions ----
// Shared-memory operands through matrix descriptors with 128-byte swizzling: the element's
// byte address from the canonical layout (K-major: ((8,m),(T,2k)):((8T,SBO),(1,T)); N-major:
// ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 16-bit elements), then address bits 4-6 XOR
// bits 7-9. Register operands and accumulators in the m64nNk16 fragment layouts (warp w of the
// warpgroup holds rows 16w + groupID (+8); accumulator i of a thread is column
// 8(i/4) + 2 threadID_in_group + i%2 of row + 8((i/2)%2); A register r holds row +8 for r odd,
// columns +8 for r >= 2, two consecutive columns per register).
// Asynchronous as on the GPU: a wgmma only records its operands; it executes when a
// wgmma.wait_group retires its committed group, reading the accumulators, the A registers
// and shared memory *then*. So a kernel that reads an accumulator before the wait, or
// overwrites P or a shared tile before the wgmma that uses it has been waited for, computes
// wrong values here too. Every thread of the block must reach the waits together.
static inline void fence_proxy_async() {}
template <int N>
static inline void pin(float (&)[N]) {}
template <int M, int N>
static inline void pin(u32 (&)[M][N]) {}
template <int N>
static inline void pin_desc(unsigned long long (&)[N]) {}

struct EmuDesc {
    u32 start, lbo, sbo;
};
static inline EmuDesc emu_desc(unsigned long long d) {
    if ((d >> 62) != 1 || ((d >> 49) & 7) != 0) {
        std::fprintf(stderr, "wgmma descriptor: not 128B swizzle with base offset 0\n");
        std::abort();
    }
    EmuDesc r{(u32)(d & 0x3FFF) << 4, (u32)((d >> 16) & 0x3FFF) << 4, (u32)((d >> 32) & 0x3FFF) << 4};
    if (((r.start >> 7) & 7) != 0) {  // the swizzle pattern must start on a 1024-byte boundary
        std::fprintf(stderr, "wgmma descriptor: start %u not on a swizzle-atom row 0\n", r.start);
        std::abort();
    }
    return r;
}
static inline u32 emu_sw128(u32 addr) { return addr ^ (((addr >> 7) & 7) << 4); }
// Element (mn, kidx) of a K-major operand (row mn of M or N, column kidx < 16 of K).
static inline u16 emu_kmajor(const EmuDesc& d, int mn, int kidx) {
    return emu_smem_b16(emu_sw128(d.start + (mn % 8) * 128 + (mn / 8) * d.sbo + (kidx / 8) * 16 + (kidx % 8) * 2));
}
// Element (kidx, n) of an N-major operand.
static inline u16 emu_nmajor(const EmuDesc& d, int kidx, int n) {
    return emu_smem_b16(emu_sw128(d.start + (n % 64) * 2 + (n / 64) * d.lbo + (kidx % 8) * 128 + (kidx / 8) * d.sbo));
}
static inline void emu_acc_pos(int i, int& row, int& col) {
    const int w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    row = 16 * w + lane / 4 + 8 * ((i / 2) % 2);
    col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
}

struct EmuWgmma {
    bool pv;         // m64n128k16 with A in registers (else m64nNk16, A from shared memory)
    bool accumulate;  // d += A B (else d = A B)
    float* d;        // the accumulators
    int nacc;        // how many (N / 2)
    const u32* a;    // the A registers (pv), read when the wgmma executes
    unsigned long long desc_a, desc_b;
};
inline thread_local std::vector<EmuWgmma> emu_wg_open;                   // not yet committed
inline thread_local std::vector<std::vector<EmuWgmma>> emu_wg_groups;    // committed, oldest first
inline thread_local int emu_wg_fenced = 0;  // wgmma.fence seen since the last wait
inline u32 emu_wg_a[8][128][4];  // per warpgroup of the block, per thread: its A registers

static inline void emu_wgmma_run(const EmuWgmma& op) {
    const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
    if (op.pv) {
        for (int r = 0; r < 4; ++r) emu_wg_a[wg][t][r] = op.a[r];
        __syncthreads();
    }
    const EmuDesc b = emu_desc(op.desc_b);
    const EmuDesc a = op.pv ? EmuDesc{} : emu_desc(op.desc_a);
    for (int i = 0; i < op.nacc; ++i) {
        int row, col;
        emu_acc_pos(i, row, col);
        float acc = op.accumulate ? op.d[i] : 0.0f;
        for (int kk = 0; kk < 16; ++kk) {
            float x, y;
            if (op.pv) {
                const int w = row / 16, g = row % 8, tg = (kk % 8) / 2;
                const int reg = ((row % 16) >= 8 ? 1 : 0) + (kk >= 8 ? 2 : 0);
                x = emu_half<true>(emu_wg_a[wg][32 * w + 4 * g + tg][reg], kk % 2);
                y = emu_bf16(emu_nmajor(b, kk, col));
            } else {
                x = emu_bf16(emu_kmajor(a, row, kk));
                y = emu_bf16(emu_kmajor(b, col, kk));
            }
            acc = std::fma(x, y, acc);
        }
        op.d[i] = acc;
    }
    if (op.pv) __syncthreads();
}

static inline void wg_fence() { emu_wg_fenced = 1; }
static inline void emu_wg_issue(const EmuWgmma& op) {
    if (!emu_wg_fenced) {  // PTX: wgmma.fence before the first wgmma after register changes
        std::fprintf(stderr, "wgmma issued without a wgmma.fence since the last wait\n");
        std::abort();
    }
    emu_wg_open.push_back(op);
}
template <int ACCUMULATE, int NACC>
static inline void wgmma_qk(float (&d)[NACC], unsigned long long desc_a, unsigned long long desc_b) {
    emu_wg_issue({false, ACCUMULATE != 0, d, NACC, nullptr, desc_a, desc_b});
}
static inline void wgmma_pv(float (&d)[64], const u32 (&a)[4], unsigned long long desc_b) {
    emu_wg_issue({true, true, d, 64, a, 0, desc_b});
}
static inline void wg_commit() {
    emu_wg_groups.push_back(std::move(emu_wg_open));
    emu_wg_open.clear();
}
template <int N>
static inline void wg_wait() {
    while (emu_wg_groups.size() > (size_t)N) {
        for (const EmuWgmma& op : emu_wg_groups.front()) emu_wgmma_run(op);
        emu_wg_groups.erase(emu_wg_groups.begin());
    }
    emu_wg_fenced = 0;
}
