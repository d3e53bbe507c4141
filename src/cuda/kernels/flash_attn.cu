// Flash-attention style forward kernel for bf16 / f16 on sm_80+ (built for sm_90 at run time
// with NVRTC, see src/cuda/attention/): no mask (the transformer's joint attention), or, compiled
// with FA_CAUSAL, causal over right-padded rows with grouped K/V heads (the Qwen3 text
// encoder). Its Hopper (wgmma) variant is flash_attn_sm90.cu, compiled appended to this file.
//
//   O[b,h,i,:] = sum_j softmax_j(scale * <Q[b,h,i,:], K[b,h,j,:]>) * V[b,h,j,:]
//
// Algorithm (FlashAttention-2 forward, Dao 2023):
//   * One thread block owns BM = 16*MT*NW query rows of one (batch, head); each of its NW warps
//     owns 16*MT of those rows, so the softmax statistics of a row never leave its warp.
//   * K/V are streamed through shared memory in tiles of BN keys, double buffered with
//     cp.async (the next tile is in flight while the current one is used).
//   * S = Q K^T and O += P V run on the tensor cores: mma.sync m16n8k16 (bf16/f16 inputs,
//     f32 accumulate); fragments are read from shared memory with ldmatrix (.trans for V).
//   * Online softmax: each row keeps its running max m and running sum l (f32). For a new
//     tile, m' = max(m, rowmax(S)); O and l are rescaled by 2^(m - m'), and P = 2^(S - m').
//     This never materialises the Sq x Sk score matrix (O(S) memory instead of O(S^2)) and
//     reads K/V once per query block. Scores are pre-multiplied by scale*log2(e) so that
//     exp() becomes a single ex2.approx instruction.
//   * P is rounded to the input dtype for the P V product (as FlashAttention does); all
//     sums, the max and the final 1/l normalisation are f32.
//   * Shared-memory rows are split in 16-byte chunks whose index is XOR-swizzled with the row
//     (chunk ^ (row & 7)), so the 8 row addresses of an ldmatrix hit 8 different bank groups.
//   * Tails: rows/keys past the sequence end and head-dim columns past the real head dim are
//     zero-filled by cp.async (src-size 0); keys past Sk get score -inf; out-of-range rows
//     and columns are not stored. Only the last K/V tile can hold keys past Sk, so the main
//     loop runs a body without those checks and the last two tiles run their own copies.
//   * Addresses: each thread copies one fixed chunk column of a tile (TileWalk), and each
//     lane's ldmatrix addresses are a per-lane register plus a compile-time constant
//     (LdsmLane), so the loop does almost no integer work: ~1000 instructions per 64-key tile
//     at D = 128 for 256 mma.sync (sm_90a SASS), down from ~2100 with the swizzle, divisions
//     and bounds computed per chunk. scripts/cuda/check-cuda-kernels.sh prints that count;
//     scripts/cuda/emulate-kernels.sh runs this kernel on the CPU (PTX helpers emulated).
//   * D (the compiled head dim) is the real head dim rounded up to a supported size, so any
//     head dim that is a multiple of 8 works.
//   * The output tile is staged through the warp's own (no longer needed) Q rows in shared
//     memory so that global stores are 16-byte and coalesced.
//
// Requirements checked on the host: scale > 0; the last dim is contiguous; every other stride
// and the start offset are multiples of 8 elements (16-byte aligned chunks); head dim % 8 == 0.
//
// No #include: NVRTC must not need the toolkit headers on the machine that runs it; bf16/f16
// values are handled as raw 16-bit words and all conversions / tensor-core ops are inline PTX.

typedef unsigned short u16;
typedef unsigned int u32;

struct alignas(16) Chunk16 {
    u32 x, y, z, w;
};

#define DEVI static __device__ __forceinline__

// The PTX helpers. tests/kernel_emu/ builds this file for the CPU with FLUX2_KERNEL_EMU
// defined and its own versions of these functions (same fragment layouts, emulated per warp).
#ifndef FLUX2_KERNEL_EMU
DEVI u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the destination.
DEVI void cp_async16(u32 dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
DEVI void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

DEVI void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
DEVI void ldsm_x4_t(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b, a: 16x16 (row), b: 16x8 (col), c: 16x8 f32.
template <bool BF16>
DEVI void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two f32 -> packed pair (lo in the low 16 bits), round to nearest even.
template <bool BF16>
DEVI u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

DEVI float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
#endif  // FLUX2_KERNEL_EMU

template <int D>
DEVI int sidx(int row, int ch) {
    constexpr int NCH = D / 8;
    constexpr int SW = NCH >= 8 ? 7 : NCH - 1;
    return row * D + ((ch ^ (row & SW)) << 3);
}

// Which chunks of a [ROWS, D] tile thread `tid` (of NT) copies: always chunk column
// c = tid % NCH, in rows r0 + k * RSTEP (k < ITER). With RSTEP a multiple of the swizzle period,
// those rows share one swizzle, so the k-th destination is the first one plus a compile-time
// stride (no per-chunk division or XOR). Same set of chunks as the plain i = tid + k * NT walk.
template <int D, int ROWS, int NT>
struct TileWalk {
    static constexpr int NCH = D / 8;
    static constexpr int SW = NCH >= 8 ? 7 : NCH - 1;
    static constexpr int RSTEP = NT / NCH;
    static constexpr int ITER = ROWS / RSTEP;
    static_assert(NT % NCH == 0 && ROWS % RSTEP == 0, "every thread copies whole columns");
    int r0, c;
    __device__ TileWalk(int tid) : r0(tid / NCH), c(tid % NCH) {}
    // Element offset of the k-th chunk in the swizzled tile.
    __device__ int dst(int k) const {
        if (RSTEP % (SW + 1) == 0) return sidx<D>(r0, c) + k * RSTEP * D;
        return sidx<D>(r0 + k * RSTEP, c);
    }
};

// Async-load rows [row0, row0+ROWS) of a [S, D] matrix (row stride ss) into a swizzled tile;
// rows past nrows and columns past dact are zero-filled. FULL promises row0 + ROWS <= nrows
// (every K/V tile but the last): then no per-chunk row check or address select is needed.
template <int D, int ROWS, int NT, bool FULL>
DEVI void load_tile(u16* dst, const u16* src, long long ss, int row0, int nrows, int dact,
                    int tid) {
    const TileWalk<D, ROWS, NT> w(tid);
    const bool col_ok = w.c * 8 < dact;
    // A zero-filled column still gets a valid address (column 0 of its row).
    const u16* p = src + (long long)(row0 + w.r0) * ss + (col_ok ? w.c * 8 : 0);
    const long long step = (long long)w.RSTEP * ss;
    const u32 base = smem_u32(dst);
#pragma unroll
    for (int k = 0; k < w.ITER; ++k) {
        if (FULL) {
            cp_async16(base + 2 * w.dst(k), p + k * step, col_ok);
        } else {
            const bool ok = col_ok && row0 + w.r0 + k * w.RSTEP < nrows;
            cp_async16(base + 2 * w.dst(k), ok ? p + k * step : src, ok);
        }
    }
}

// Byte offsets of the 16-byte chunks one lane hands to ldmatrix: logical row R + lane_row and
// chunk C + lane_ch of a swizzled tile, for R a multiple of 8 and C even (every ldmatrix of the
// kernel). The swizzle XOR then only mixes the lane's own bits with the low bits of C, so
//   offset(R, C) = lane[(C & SW) / 2] + R * 2D + (C & ~SW) * 16,
// a per-lane register plus a compile-time constant (no address arithmetic per ldmatrix).
template <int D>
struct LdsmLane {
    static constexpr int NCH = D / 8;
    static constexpr int SW = NCH >= 8 ? 7 : NCH - 1;
    static constexpr int NV = (SW + 1) / 2;
    u32 lane[NV];
    __device__ LdsmLane(int lane_row, int lane_ch) {
#pragma unroll
        for (int m = 0; m < NV; ++m) lane[m] = 2 * sidx<D>(lane_row, 2 * m + lane_ch);
    }
    __device__ u32 at(int r, int c) const {
        return lane[(c & SW) >> 1] + r * 2 * D + (c & ~SW) * 16;
    }
};

// What a tile prefetches: nothing (the last tile), the last tile (rows may run past sk), or a
// full tile.
enum { NEXT_NONE, NEXT_PARTIAL, NEXT_FULL };

// One K/V tile of the main loop: wait for it, start loading the next one (NEXT), S = Q K^T,
// online softmax, O += P V. MASKED says whether keys past sk can occur (only in the last
// tile). The caller runs the steady-state body (unmasked, full prefetch) in its loop and the
// last two tiles separately, so the loop has no per-tile mask or bounds work (ptxas would
// otherwise predicate it into every tile). The per-thread constants live here; the
// accumulators stay with the caller (everything is inlined into registers).
template <int D, int NW, int MT, int BN, bool BF16, bool CAUSAL = false>
struct FaTile {
    static constexpr int ND = D / 8;   // n-tiles of the output (8 columns each)
    static constexpr int NK = BN / 8;  // n-tiles of the scores (8 keys each)
    static constexpr int NT = NW * 32;
    u16* ks;
    u16* vs;
    const u16* k;
    const u16* v;
    long long k_ss, v_ss;
    int sk, dact, tid, ntiles, tig;
    float scale_log2;
    u32 q_warp;  // shared address of this warp's Q rows
    LdsmLane<D> qv_lane, k_lane;
    // CAUSAL only: the last key each of this thread's rows may see, min(row, kv_valid - 1),
    // for rows gid and gid + 8 of each 16-row slice.
    int key_last[MT][2];

    template <bool MASKED, int NEXT>
    __device__ __forceinline__ void run(const int t, float (&acc)[MT][ND][4],
                                        float (&row_max)[MT][2], float (&row_sum)[MT][2]) const {
        cp_async_wait_all();
        __syncthreads();
        if (NEXT != NEXT_NONE) {
            const int nb = (t + 1) & 1;
            constexpr bool FULL = NEXT == NEXT_FULL;
            load_tile<D, BN, NT, FULL>(ks + nb * BN * D, k, k_ss, (t + 1) * BN, sk, dact, tid);
            load_tile<D, BN, NT, FULL>(vs + nb * BN * D, v, v_ss, (t + 1) * BN, sk, dact, tid);
        }
        cp_async_commit();
        const u32 kb = smem_u32(ks) + 2 * (t & 1) * BN * D;
        const u32 vb = smem_u32(vs) + 2 * (t & 1) * BN * D;

        // ---- S = Q K^T (f32) ----
        float s[MT][NK][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NK; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][n][e] = 0.f;

#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ldsm_x4(qa[mt], q_warp + qv_lane.at(mt * 16, kk * 2));
            }
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 kf[4];
                ldsm_x4(kf, kb + k_lane.at(np * 16, kk * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<BF16>(s[mt][2 * np], qa[mt], kf[0], kf[1]);
                    mma16816<BF16>(s[mt][2 * np + 1], qa[mt], kf[2], kf[3]);
                }
            }
        }

        // ---- mask keys past the end ----
        if (MASKED && (t + 1) * BN > sk) {
            const float ninf = -__int_as_float(0x7f800000);
#pragma unroll
            for (int n = 0; n < NK; ++n) {
                const int c = t * BN + n * 8 + tig * 2;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (c >= sk) { s[mt][n][0] = ninf; s[mt][n][2] = ninf; }
                    if (c + 1 >= sk) { s[mt][n][1] = ninf; s[mt][n][3] = ninf; }
                }
            }
        }

        // ---- causal / padding mask: keys past each row's last visible key ----
        // (A separate block on purpose: folding the end-of-keys mask above into it, as
        // key_last <= sk - 1 would allow, changes the plain kernel's code and takes the causal
        // instance from 4 to 56 bytes of spills under ptxas for sm_90a.)
        if (CAUSAL && MASKED) {
            const float ninf = -__int_as_float(0x7f800000);
#pragma unroll
            for (int n = 0; n < NK; ++n) {
                const int c = t * BN + n * 8 + tig * 2;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        if (c > key_last[mt][r]) s[mt][n][2 * r] = ninf;
                        if (c + 1 > key_last[mt][r]) s[mt][n][2 * r + 1] = ninf;
                    }
                }
            }
        }

        // ---- online softmax (rows gid and gid+8 of each 16-row slice) ----
        float alpha[MT][2];
        bool max_moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // Max of the raw scores, scaled once: max(c*s) = c*max(s) because the host
                // only launches with scale > 0.
                float raw = s[mt][0][2 * r];
#pragma unroll
                for (int n = 0; n < NK; ++n) {
                    raw = fmaxf(raw, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                }
                raw = fmaxf(raw, __shfl_xor_sync(0xffffffffu, raw, 1));
                raw = fmaxf(raw, __shfl_xor_sync(0xffffffffu, raw, 2));
                // Finite: key t*BN < sk is always valid, so every row has a real score.
                // (CAUSAL: a row may see no key of a later tile, raw = -inf; key 0, in the
                // first tile, is visible to every row, so row_max is finite by then.)
                const float mx = fmaxf(row_max[mt][r], raw * scale_log2);
                alpha[mt][r] = fast_exp2(row_max[mt][r] - mx);
                max_moved |= mx != row_max[mt][r];
                row_max[mt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < NK; ++n) {
                    const float p0 = fast_exp2(fmaf(s[mt][n][2 * r], scale_log2, -mx));
                    const float p1 = fast_exp2(fmaf(s[mt][n][2 * r + 1], scale_log2, -mx));
                    s[mt][n][2 * r] = p0;
                    s[mt][n][2 * r + 1] = p1;
                    sum += p0 + p1;
                }
                // Partial (per-thread) sum; the quad reduction happens once at the end.
                row_sum[mt][r] = row_sum[mt][r] * alpha[mt][r] + sum;
            }
        }
        // Rescale O only when some row of the warp found a new max: otherwise every alpha is
        // exactly 2^0 = 1 and the multiplications would change nothing. Once the running
        // maxima settle, most tiles skip these D/4 * MT * 2 multiplications per thread.
        if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    acc[mt][n][0] *= alpha[mt][0];
                    acc[mt][n][1] *= alpha[mt][0];
                    acc[mt][n][2] *= alpha[mt][1];
                    acc[mt][n][3] *= alpha[mt][1];
                }
        }

        // ---- O += P V ----
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2<BF16>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack2<BF16>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack2<BF16>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2<BF16>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 vf[4];
                ldsm_x4_t(vf, vb + qv_lane.at(kk * 16, dp * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<BF16>(acc[mt][2 * dp], pa[mt], vf[0], vf[1]);
                    mma16816<BF16>(acc[mt][2 * dp + 1], pa[mt], vf[2], vf[3]);
                }
            }
        }
    }
};

// Moves q, k, v, o to this block's (batch, head) = (blockIdx.z, blockIdx.y) slice.
DEVI void to_batch_head(const u16* __restrict__& q, const u16* __restrict__& k,
                        const u16* __restrict__& v, u16* __restrict__& o, long long q_sb,
                        long long q_sh, long long k_sb, long long k_sh, long long v_sb,
                        long long v_sh, long long o_sb, long long o_sh, int kv_group = 1) {
    const long long h = blockIdx.y, b = blockIdx.z;
    const long long kv_h = h / kv_group;  // grouped-query attention: kv_group query heads per K/V head
    q += b * q_sb + h * q_sh;
    k += b * k_sb + kv_h * k_sh;
    v += b * v_sb + kv_h * v_sh;
    o += b * o_sb + h * o_sh;
}

// CAUSAL: query row i sees key j iff j <= i and j < kv_valid (a causal decoder over a
// right-padded sequence: Qwen3 in the text encoder), and kv_group query heads share one K/V
// head. Otherwise every query sees every key (kv_valid and kv_group are unused).
template <int D, int NW, int MT, int BN, bool BF16, bool CAUSAL = false>
DEVI void fa_fwd_impl(const u16* __restrict__ q, const u16* __restrict__ k,
                      const u16* __restrict__ v, u16* __restrict__ o, int sq, int sk, int dact,
                      long long q_sb, long long q_sh, long long q_ss, long long k_sb,
                      long long k_sh, long long k_ss, long long v_sb, long long v_sh,
                      long long v_ss, long long o_sb, long long o_sh, long long o_ss,
                      float scale_log2, int kv_valid = 0, int kv_group = 1) {
    static_assert(D % 16 == 0 && BN % 16 == 0, "tile sizes");
    constexpr int NCH = D / 8;
    constexpr int BM = 16 * MT * NW;
    constexpr int NT = NW * 32;
    constexpr int ND = D / 8;  // n-tiles of the output (8 columns each)

    extern __shared__ Chunk16 smem_chunks[];
    u16* qs = reinterpret_cast<u16*>(smem_chunks);
    u16* ks = qs + BM * D;       // 2 buffers of BN x D
    u16* vs = ks + 2 * BN * D;   // 2 buffers of BN x D

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int m0 = blockIdx.x * BM;
    to_batch_head(q, k, v, o, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, o_sb, o_sh,
                  CAUSAL ? kv_group : 1);
    // CAUSAL: no row of this block sees a key past min(m0 + BM, kv_valid); the block reads
    // only those (the host guarantees 1 <= kv_valid <= sk).
    if (CAUSAL) sk = min(sk, min(m0 + BM, kv_valid));

    load_tile<D, BM, NT, false>(qs, q, q_ss, m0, sq, dact, tid);
    load_tile<D, BN, NT, false>(ks, k, k_ss, 0, sk, dact, tid);
    load_tile<D, BN, NT, false>(vs, v, v_ss, 0, sk, dact, tid);
    cp_async_commit();

    float acc[MT][ND][4];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < ND; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
        }
        row_max[mt][0] = row_max[mt][1] = -__int_as_float(0x7f800000);
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

    const int wr0 = warp * 16 * MT;  // first row of this warp inside the block tile
    const int ntiles = (sk + BN - 1) / BN;

    // Per-lane ldmatrix row/chunk offsets (see the fragment layouts of mma.m16n8k16).
    // Q (A operand) and V (B operand, transposed) take the same lane pattern.
    const LdsmLane<D> qv_lane((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
    const LdsmLane<D> k_lane((lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);  // K (B, non-trans)
    const u32 q_warp = smem_u32(qs) + 2 * wr0 * D;  // this warp's Q rows

    FaTile<D, NW, MT, BN, BF16, CAUSAL> tile{ks, vs, k, v, k_ss, v_ss, sk, dact, tid, ntiles,
                                             tig, scale_log2, q_warp, qv_lane, k_lane};
    int t = 0;
    if (CAUSAL) {
        // Tiles every row of the block sees whole run unmasked; the ones across the diagonal
        // (or the padding edge) mask per row. Short sequences: the copies stay bounds-checked.
        const int first_row_last_key = min(m0, kv_valid - 1);
        const int full_tiles = (first_row_last_key + 1) / BN;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                tile.key_last[mt][r] = min(m0 + wr0 + mt * 16 + gid + 8 * r, kv_valid - 1);
        for (; t + 1 < ntiles; ++t) {
            if (t < full_tiles) tile.template run<false, NEXT_PARTIAL>(t, acc, row_max, row_sum);
            else tile.template run<true, NEXT_PARTIAL>(t, acc, row_max, row_sum);
        }
        if (t < ntiles) tile.template run<true, NEXT_NONE>(t, acc, row_max, row_sum);
    } else {
        for (; t + 2 < ntiles; ++t) tile.template run<false, NEXT_FULL>(t, acc, row_max, row_sum);
        if (t + 1 < ntiles) tile.template run<false, NEXT_PARTIAL>(t++, acc, row_max, row_sum);
        if (t < ntiles) tile.template run<true, NEXT_NONE>(t, acc, row_max, row_sum);
    }
    cp_async_wait_all();

    // ---- epilogue: O / l, staged through this warp's own Q rows ----
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[r] = 1.f / l;
        }
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            const int row = wr0 + mt * 16 + gid;
            *reinterpret_cast<u32*>(qs + sidx<D>(row, n) + tig * 2) =
                pack2<BF16>(acc[mt][n][0] * inv[0], acc[mt][n][1] * inv[0]);
            *reinterpret_cast<u32*>(qs + sidx<D>(row + 8, n) + tig * 2) =
                pack2<BF16>(acc[mt][n][2] * inv[1], acc[mt][n][3] * inv[1]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * MT * NCH; i += 32) {
        const int r = i / NCH, c = i % NCH;
        const int gr = m0 + wr0 + r;
        if (gr < sq && c * 8 < dact) {
            *reinterpret_cast<Chunk16*>(o + (long long)gr * o_ss + c * 8) =
                *reinterpret_cast<const Chunk16*>(qs + sidx<D>(wr0 + r, c));
        }
    }
}

// Kernel entry points: fa_fwd_<dtype>_d<D>_w<NW>_m<MT>_n<BN>.
// Grid: (ceil(Sq / (16*MT*NW)), H, B); block: NW*32 threads;
// dynamic shared memory: (16*MT*NW + 4*BN) * D * 2 bytes.
// FA_PARAMS / FA_ARGS: the entries' common parameter list (attention/op.rs pushes it in this
// order) and its forwarding to fa_fwd_impl.
#define FA_PARAMS                                                                              \
    const u16 *__restrict__ q, const u16 *__restrict__ k, const u16 *__restrict__ v,           \
        u16 *__restrict__ o, int sq, int sk, int dact, long long q_sb, long long q_sh,         \
        long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,        \
        long long v_sh, long long v_ss, long long o_sb, long long o_sh, long long o_ss,        \
        float scale_log2
#define FA_ARGS                                                                                \
    q, k, v, o, sq, sk, dact, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, \
        o_ss, scale_log2
#define FA_KERNEL(DT, IS_BF16, D, NW, MT, BN)                                                   \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                       \
        fa_fwd_##DT##_d##D##_w##NW##_m##MT##_n##BN(FA_PARAMS) {                                 \
        fa_fwd_impl<D, NW, MT, BN, IS_BF16>(FA_ARGS);                                           \
    }

// The causal variant (FaTile CAUSAL): fa_causal_<dtype>_d<D>_w<NW>_m<MT>_n<BN>, the same
// arguments plus kv_valid (keys 0..kv_valid are real tokens, 1 <= kv_valid <= sk) and kv_group
// (query heads per K/V head; grid.y counts query heads). Compiled instead of the plain
// instances when FA_CAUSAL is defined (its own NVRTC module, loaded only by the text encoder).
#define FA_CAUSAL_KERNEL(DT, IS_BF16, D, NW, MT, BN)                                            \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                       \
        fa_causal_##DT##_d##D##_w##NW##_m##MT##_n##BN(FA_PARAMS, int kv_valid, int kv_group) {  \
        fa_fwd_impl<D, NW, MT, BN, IS_BF16, true>(FA_ARGS, kv_valid, kv_group);                 \
    }
#ifdef FA_CAUSAL
#define FA_INSTANCE FA_CAUSAL_KERNEL
#else
#define FA_INSTANCE FA_KERNEL
#endif

// attention/select.rs compiles one head dim and one dtype at a time (-DFA_ONLY_D=<D>,
// -DFA_ONLY_BF16 / -DFA_ONLY_F16): NVRTC and the driver's JIT take ~1 s per instance, and a
// process only needs the head dim and dtype of its model (first-run cold start).
#if defined(FA_ONLY_F16)
#define FA_KERNEL_BF16(D, NW, MT, BN)
#else
#define FA_KERNEL_BF16(D, NW, MT, BN) FA_INSTANCE(bf16, true, D, NW, MT, BN)
#endif
#if defined(FA_ONLY_BF16)
#define FA_KERNEL_F16(D, NW, MT, BN)
#else
#define FA_KERNEL_F16(D, NW, MT, BN) FA_INSTANCE(f16, false, D, NW, MT, BN)
#endif
#define FA_KERNELS(D, NW, MT, BN) FA_KERNEL_BF16(D, NW, MT, BN) FA_KERNEL_F16(D, NW, MT, BN)

// The configurations attention/select.rs launches (keep in sync with `KernelConfig::for_head_dim`).
#if !defined(FA_ONLY_D) || FA_ONLY_D == 16
FA_KERNELS(16, 4, 1, 64)
#endif
#if !defined(FA_ONLY_D) || FA_ONLY_D == 32
FA_KERNELS(32, 4, 1, 64)
#endif
#if !defined(FA_ONLY_D) || FA_ONLY_D == 64
FA_KERNELS(64, 4, 1, 64)
#endif
#if !defined(FA_ONLY_D) || FA_ONLY_D == 128
FA_KERNELS(128, 4, 2, 64)
#endif
#if !defined(FA_ONLY_D) || FA_ONLY_D == 256
FA_KERNELS(256, 4, 1, 32)
#endif

#ifdef FA_BENCH_VARIANTS
// Extra D = 128 tilings, only compiled by the benchmark script (scripts/gpu/gpu_attention_check.sh).
FA_KERNEL(bf16, true, 128, 8, 1, 64)
FA_KERNEL(bf16, true, 128, 4, 1, 64)
FA_KERNEL(bf16, true, 128, 4, 1, 32)
FA_KERNEL(bf16, true, 128, 8, 1, 32)
FA_KERNEL(bf16, true, 128, 4, 2, 32)
#endif
