// Flash-attention style forward kernel (no mask) for bf16 / f16 on sm_80+ (built for sm_90 at
// run time with NVRTC, see flash_attn.rs).
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
//     and bounds computed per chunk. scripts/check-cuda-kernels.sh prints that count;
//     scripts/emulate-kernels.sh runs this kernel on the CPU (PTX helpers emulated).
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

// The PTX helpers. scripts/kernel_emu/ builds this file for the CPU with FLUX2_KERNEL_EMU
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
template <int D, int NW, int MT, int BN, bool BF16>
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

template <int D, int NW, int MT, int BN, bool BF16>
DEVI void fa_fwd_impl(const u16* __restrict__ q, const u16* __restrict__ k,
                      const u16* __restrict__ v, u16* __restrict__ o, int sq, int sk, int dact,
                      long long q_sb, long long q_sh, long long q_ss, long long k_sb,
                      long long k_sh, long long k_ss, long long v_sb, long long v_sh,
                      long long v_ss, long long o_sb, long long o_sh, long long o_ss,
                      float scale_log2) {
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
    const long long h = blockIdx.y, b = blockIdx.z;
    q += b * q_sb + h * q_sh;
    k += b * k_sb + h * k_sh;
    v += b * v_sb + h * v_sh;
    o += b * o_sb + h * o_sh;

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

    const FaTile<D, NW, MT, BN, BF16> tile{ks, vs, k, v, k_ss, v_ss, sk, dact, tid, ntiles, tig,
                                          scale_log2, q_warp, qv_lane, k_lane};
    int t = 0;
    for (; t + 2 < ntiles; ++t) tile.template run<false, NEXT_FULL>(t, acc, row_max, row_sum);
    if (t + 1 < ntiles) tile.template run<false, NEXT_PARTIAL>(t++, acc, row_max, row_sum);
    if (t < ntiles) tile.template run<true, NEXT_NONE>(t, acc, row_max, row_sum);
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
#define FA_KERNEL(DT, IS_BF16, D, NW, MT, BN)                                                   \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                       \
        fa_fwd_##DT##_d##D##_w##NW##_m##MT##_n##BN(                                             \
            const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,    \
            u16* __restrict__ o, int sq, int sk, int dact, long long q_sb, long long q_sh,      \
            long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,     \
            long long v_sh, long long v_ss, long long o_sb, long long o_sh, long long o_ss,     \
            float scale_log2) {                                                                 \
        fa_fwd_impl<D, NW, MT, BN, IS_BF16>(q, k, v, o, sq, sk, dact, q_sb, q_sh, q_ss, k_sb,   \
                                            k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss,     \
                                            scale_log2);                                        \
    }

// flash_attn.rs compiles one head dim and one dtype at a time (-DFA_ONLY_D=<D>,
// -DFA_ONLY_BF16 / -DFA_ONLY_F16): NVRTC and the driver's JIT take ~1 s per instance, and a
// process only needs the head dim and dtype of its model (first-run cold start).
#if defined(FA_ONLY_F16)
#define FA_KERNEL_BF16(D, NW, MT, BN)
#else
#define FA_KERNEL_BF16(D, NW, MT, BN) FA_KERNEL(bf16, true, D, NW, MT, BN)
#endif
#if defined(FA_ONLY_BF16)
#define FA_KERNEL_F16(D, NW, MT, BN)
#else
#define FA_KERNEL_F16(D, NW, MT, BN) FA_KERNEL(f16, false, D, NW, MT, BN)
#endif
#define FA_KERNELS(D, NW, MT, BN) FA_KERNEL_BF16(D, NW, MT, BN) FA_KERNEL_F16(D, NW, MT, BN)

// The configurations flash_attn.rs launches (keep in sync with `KernelConfig::for_head_dim`).
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
// Extra D = 128 tilings, only compiled by the benchmark script (scripts/gpu_attention_check.sh).
FA_KERNEL(bf16, true, 128, 8, 1, 64)
FA_KERNEL(bf16, true, 128, 4, 1, 64)
FA_KERNEL(bf16, true, 128, 4, 1, 32)
FA_KERNEL(bf16, true, 128, 8, 1, 32)
FA_KERNEL(bf16, true, 128, 4, 2, 32)
#endif


// ================================================================================================
// Hopper variant (FA_SM90, compiled for compute_90a): the same algorithm with warpgroup MMAs
// (wgmma.mma_async) instead of mma.sync, bf16, head dim 128. A block of two warpgroups owns 128
// query rows (64 per warpgroup); K/V tiles of 64 keys are double buffered with cp.async as
// above. S = Q K^T reads Q and K straight from shared memory through matrix descriptors; P V
// takes P from registers (the S accumulator layout is the A-fragment layout) and V from shared
// memory, N-major (imm-trans-b). Shared-memory tiles use the canonical 128-byte-swizzle layout
// of the PTX ISA ("Shared Memory Matrix Layout"): the head dim in panels of 64 columns, each
// panel [rows][128 B] with 16-byte chunk c of row r stored at chunk c ^ (r & 7), panels and
// tiles 1024-byte aligned (descriptor base offset 0). One wgmma k-step (16 columns, 32 bytes)
// is the panel's descriptor start advanced by 32 bytes; the hardware applies the swizzle to the
// address bits. Per tile, S(t+1) = Q K(t+1)^T and O += P(t) V(t) are issued together and the
// softmax of S(t+1) runs while P(t) V(t) is still on the tensor cores (FlashAttention-3's
// intra-warpgroup overlap); K(t+2) and V(t+1) load meanwhile. scripts/kernel_emu emulates the
// instructions from the PTX ISA's definitions, asynchronously (a wgmma reads its operands when
// its group is waited for), so a missing wait or an early overwrite shows there too.
#ifdef FA_SM90
#define FA_HAS_SM90 1  // for scripts/kernel_emu (older revisions of this file lack the variant)
#ifndef FLUX2_KERNEL_EMU
DEVI void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DEVI void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed groups of this warpgroup's wgmmas are pending.
template <int N>
DEVI void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async
// proxy: each writing thread orders the two before the barrier.
DEVI void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The accumulators change behind the compiler's back until wgmma.wait_group: pin each one
// (CUTLASS's warpgroup_fence_operand) so no read or write moves across the wait.
template <int N>
DEVI void pin(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Descriptors computed before a wgmma.fence stay there (not sunk between the wgmmas).
template <int N>
DEVI void pin_desc(unsigned long long (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+l"(d[i])::"memory");
}
// The same for A-fragment registers a wgmma still reads: kept live (not reused for other
// values by the register allocator) until after the wait.
template <int M, int N>
DEVI void pin(u32 (&a)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// d[64x64] = A[64x16] (descriptor, K-major) * B[16x64] (descriptor, K-major) (+ d when
// accumulate), bf16 -> f32.
template <int ACCUMULATE>
DEVI void wgmma_qk(float (&d)[32], unsigned long long desc_a, unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "n"(ACCUMULATE)
        : "memory");
}

// d[64x128] = A[64x16] (descriptor, K-major) * B[16x128] (descriptor, K-major) (+ d when
// accumulate), bf16 -> f32: the S tile of the 128-key variant.
template <int ACCUMULATE>
DEVI void wgmma_qk(float (&d)[64], unsigned long long desc_a, unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "n"(ACCUMULATE)
        : "memory");
}

// d[64x128] += A[64x16] (registers) * B[16x128] (descriptor, N-major), bf16 -> f32.
DEVI void wgmma_pv(float (&d)[64], const u32 (&a)[4], unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1)
        : "memory");
}
#endif  // FLUX2_KERNEL_EMU

// Matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading and stride
// byte offsets (each >> 4), 128-byte swizzle (mode 1 in bits 62-63), base offset 0.
DEVI unsigned long long sw128_desc(u32 addr, u32 lbo, u32 sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) |
           ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// d = Q K^T (64 x N keys, N = 2 * the accumulator count) over the 8 k-steps of head dim 128
// (descriptors per k-step).
template <int NACC>
DEVI void wgmma_qk_all(float (&d)[NACC], const unsigned long long (&dq)[8],
                       const unsigned long long (&dk)[8]) {
    wgmma_qk<0>(d, dq[0], dk[0]);
#pragma unroll
    for (int kk = 1; kk < 8; ++kk) wgmma_qk<1>(d, dq[kk], dk[kk]);
}

// Async-load rows [row0, row0 + ROWS) of a [S, 128] matrix (row stride ss) into the swizzled
// panel layout at dst (1024-byte aligned); rows past nrows are zero-filled (FULL promises there
// are none). Thread tid (of 256) copies chunk column c = tid % 16 of rows tid / 16 + 16 j: with
// 16 a multiple of the swizzle period, its destinations are one offset plus j * 16 rows.
template <int ROWS, bool FULL>
DEVI void load_panels(u32 dst, const u16* src, long long ss, int row0, int nrows, int tid) {
    const int c = tid & 15, r0 = tid >> 4;
    const u32 d0 = dst + (c >> 3) * (ROWS * 128) + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4);
    const u16* p = src + (long long)(row0 + r0) * ss + c * 8;
#pragma unroll
    for (int j = 0; j < ROWS / 16; ++j) {
        const bool ok = FULL || row0 + r0 + 16 * j < nrows;
        cp_async16(d0 + j * (16 * 128), ok ? p + (long long)(16 * j) * ss : src, ok);
    }
}
// Tile `tile` of K or V (BN rows) into the buffer at dst.
template <int BN>
DEVI void load_kv_tile(u32 dst, const u16* src, long long ss, int tile, int sk, int tid) {
    if ((tile + 1) * BN <= sk) load_panels<BN, true>(dst, src, ss, tile * BN, sk, tid);
    else load_panels<BN, false>(dst, src, ss, tile * BN, sk, tid);
}

// Score s[idx] of an S tile of BN keys, -inf for keys past sk when MASKED (only the last
// tile can hold them). s[4j + e]: row gid (e < 2) or gid + 8, key tile*BN + 8j + 2 tig + (e & 1).
template <bool MASKED, int BN>
DEVI float score(const float (&s)[BN / 2], int idx, int tile, int sk, int tig) {
    if (!MASKED) return s[idx];
    const int key = tile * BN + 8 * (idx >> 2) + 2 * tig + (idx & 1);
    return key < sk ? s[idx] : -__int_as_float(0x7f800000);
}

// Online softmax of one S tile into the bf16 A fragments of P (pa[k-step][register]: register
// r + 2 (j & 1) of k-step j / 2 holds row r's pair of n-tile j), updating the row statistics;
// alpha gets each row's rescale factor for O, and the return value says whether any row of the
// warp moved its max. s is only read: ptxas serializes every wgmma of the kernel (warning
// C7513) if the registers of a wgmma's accumulator are written while another wgmma is in
// flight, and this runs while P V is.
template <bool MASKED, int BN>
DEVI bool softmax_tile(const float (&s)[BN / 2], int tile, int sk, int tig, float scale_log2,
                       float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2],
                       u32 (&pa)[BN / 16][4]) {
    bool max_moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float raw = score<MASKED, BN>(s, 2 * r, tile, sk, tig);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            raw = fmaxf(raw, fmaxf(score<MASKED, BN>(s, 4 * j + 2 * r, tile, sk, tig),
                                   score<MASKED, BN>(s, 4 * j + 2 * r + 1, tile, sk, tig)));
        }
        raw = fmaxf(raw, __shfl_xor_sync(0xffffffffu, raw, 1));
        raw = fmaxf(raw, __shfl_xor_sync(0xffffffffu, raw, 2));
        // Finite: key tile*BN < sk is always valid, so every row has a real score.
        const float mx = fmaxf(row_max[r], raw * scale_log2);
        alpha[r] = fast_exp2(row_max[r] - mx);
        max_moved |= mx != row_max[r];
        row_max[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const float p0 = fast_exp2(fmaf(score<MASKED, BN>(s, 4 * j + 2 * r, tile, sk, tig), scale_log2, -mx));
            const float p1 = fast_exp2(fmaf(score<MASKED, BN>(s, 4 * j + 2 * r + 1, tile, sk, tig), scale_log2, -mx));
            sum += p0 + p1;
            pa[j >> 1][r + 2 * (j & 1)] = pack2<true>(p0, p1);
        }
        row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
    return __any_sync(0xffffffffu, max_moved);
}

// The tiles of fa90_fwd_impl's main loop (everything inlines into registers).
template <int BN>
struct Fa90Loop {
    static constexpr int D = 128;
    static constexpr int PANEL_Q = 128 * 128, PANEL_KV = BN * 128;  // bytes per 64-column panel
    static constexpr int TILE = BN * D * 2;                        // bytes per K or V buffer
    const u16* k;
    const u16* v;
    long long k_ss, v_ss;
    int sk, ntiles, tid, tig;
    float scale_log2;
    u32 ks, vs;
    unsigned long long q_desc, k_desc, v_desc;

    // Tile t < ntiles - 1: S(t+1) = Q K(t+1)^T and O += P(t) V(t) (P(t) in pc) in flight
    // together, the softmax of S(t+1) (into pn) while P V runs.
    __device__ __forceinline__ void step(int t, float (&s)[BN / 2], float (&acc)[64],
                                         u32 (&pc)[BN / 16][4], u32 (&pn)[BN / 16][4],
                                         float (&row_max)[2], float (&row_sum)[2]) const {
        // Everything loaded so far has landed (K(t+1), V(t)); both warpgroups are done with
        // S(t) and P(t-1) V(t-1), so K buffer t&1 and V buffer (t+1)&1 are free.
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();
        if (t + 2 < ntiles) load_kv_tile<BN>(ks + (t & 1) * TILE, k, k_ss, t + 2, sk, tid);
        load_kv_tile<BN>(vs + ((t + 1) & 1) * TILE, v, v_ss, t + 1, sk, tid);
        cp_async_commit();

        // All descriptors before the fence: ptxas serializes the wgmmas (warning C7513) when
        // their input registers are computed between the fence and the wait.
        const unsigned long long kbuf = ((t + 1) & 1) * (TILE / 16), vbuf = (t & 1) * (TILE / 16);
        unsigned long long dq[D / 16], dk[D / 16], dv[BN / 16];
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int panel = kk >> 2, off = (kk & 3) * 32;
            dq[kk] = q_desc + (panel * PANEL_Q + off) / 16;
            dk[kk] = k_desc + kbuf + (panel * PANEL_KV + off) / 16;
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) dv[kk] = v_desc + vbuf + kk * (16 * 128 / 16);
        pin_desc(dq);
        pin_desc(dk);
        pin_desc(dv);
        pin(pc);  // P and the rescaled O are complete before the fence, too
        pin(acc);
        wg_fence();
        wgmma_qk_all(s, dq, dk);  // S(t+1) = Q K(t+1)^T
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wgmma_pv(acc, pc[kk], dv[kk]);  // O += P(t) V(t)
        wg_commit();
        wg_wait<1>();  // S(t+1) done; its softmax runs while P(t) V(t) does
        pin(s);
        float alpha[2];
        const bool rescale =
            t + 2 == ntiles
                ? softmax_tile<true, BN>(s, t + 1, sk, tig, scale_log2, row_max, row_sum, alpha, pn)
                : softmax_tile<false, BN>(s, t + 1, sk, tig, scale_log2, row_max, row_sum, alpha, pn);
        wg_wait<0>();
        pin(acc);
        pin(pc);
        if (rescale) {  // every alpha is exactly 1 otherwise
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                acc[4 * j] *= alpha[0];
                acc[4 * j + 1] *= alpha[0];
                acc[4 * j + 2] *= alpha[1];
                acc[4 * j + 3] *= alpha[1];
            }
        }
    }

    // The last tile t: P(t) V(t) only.
    __device__ __forceinline__ void last(int t, float (&acc)[64], u32 (&pc)[BN / 16][4]) const {
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();
        unsigned long long dv[BN / 16];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) dv[kk] = v_desc + (t & 1) * (TILE / 16) + kk * (16 * 128 / 16);
        pin_desc(dv);
        pin(pc);
        pin(acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) wgmma_pv(acc, pc[kk], dv[kk]);
        wg_commit();
        wg_wait<0>();
        pin(acc);
        pin(pc);
    }
};

// The structure per warpgroup (FlashAttention-3's intra-warpgroup pipelining): while the
// tensor cores run O += P(t) V(t), the warps already do the softmax of S(t+1), whose wgmmas
// were issued just before; the K/V tiles for t+2 / t+1 load meanwhile (cp.async).
template <int BN>
DEVI void fa90_fwd_impl(const u16* __restrict__ q, const u16* __restrict__ k,
                        const u16* __restrict__ v, u16* __restrict__ o, int sq, int sk,
                        long long q_sb, long long q_sh, long long q_ss, long long k_sb,
                        long long k_sh, long long k_ss, long long v_sb, long long v_sh,
                        long long v_ss, long long o_sb, long long o_sh, long long o_ss,
                        float scale_log2) {
    constexpr int D = 128, BM = 128;
    constexpr int PANEL_Q = BM * 128, PANEL_KV = BN * 128;  // bytes per 64-column panel
    constexpr int TILE = BN * D * 2;                        // bytes per K or V buffer
    extern __shared__ Chunk16 smem_chunks[];
    const u32 base = (smem_u32(smem_chunks) + 1023) & ~1023u;  // launched with +1024 bytes
    const u32 qs = base;             // 2 panels of BM rows
    const u32 ks = qs + BM * D * 2;  // 2 buffers of 2 panels of BN rows
    const u32 vs = ks + 2 * TILE;    // 2 buffers of 2 panels of BN rows

    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
    const int gid = lane >> 2, tig = lane & 3;
    const int m0 = blockIdx.x * BM;
    const long long h = blockIdx.y, b = blockIdx.z;
    q += b * q_sb + h * q_sh;
    k += b * k_sb + h * k_sh;
    v += b * v_sb + h * v_sh;
    o += b * o_sb + h * o_sh;
    const int ntiles = (sk + BN - 1) / BN;

    // Descriptors of the first k-step; the others add their byte offset >> 4 to the start
    // address field (14 bits: no carry into the next field, shared memory is < 256 KiB).
    const unsigned long long q_desc = sw128_desc(qs + wg * 64 * 128, 16, 1024);  // own 64 rows
    const unsigned long long k_desc = sw128_desc(ks, 16, 1024);
    // V is N-major: per the PTX ISA the leading byte offset steps along N (to the next 64
    // head-dim columns, a panel) and the stride byte offset along K (the next 8 keys).
    // FA90_V_OFFSETS_SWAPPED builds the other reading, for scripts/gpu_attention_check.sh to
    // try should this one fail on a GPU (it does not pass the CPU emulation).
#ifndef FA90_V_OFFSETS_SWAPPED
    const unsigned long long v_desc = sw128_desc(vs, PANEL_KV, 1024);
#else
    const unsigned long long v_desc = sw128_desc(vs, 1024, PANEL_KV);
#endif

    float s[BN / 2];      // S of the tile whose softmax comes next
    u32 pa[BN / 16][4];   // P of the tile whose P V runs (bf16 A fragments per 16-key k-step)
    u32 pn[BN / 16][4];   // P of the next tile, written while pa is still being read
    float acc[64];  // O rows (wq*16 + gid, + 8) of this warpgroup, 16 n-tiles of 8 columns
    float row_max[2], row_sum[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    row_max[0] = row_max[1] = -__int_as_float(0x7f800000);
    row_sum[0] = row_sum[1] = 0.f;

    // Prologue: Q, K0, V0 (and K1), then S(0) and its softmax.
    load_panels<BM, false>(qs, q, q_ss, m0, sq, tid);
    load_kv_tile<BN>(ks, k, k_ss, 0, sk, tid);
    load_kv_tile<BN>(vs, v, v_ss, 0, sk, tid);
    if (ntiles > 1) load_kv_tile<BN>(ks + TILE, k, k_ss, 1, sk, tid);
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    {
        unsigned long long dq[D / 16], dk[D / 16];
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int panel = kk >> 2, off = (kk & 3) * 32;
            dq[kk] = q_desc + (panel * PANEL_Q + off) / 16;
            dk[kk] = k_desc + (panel * PANEL_KV + off) / 16;
        }
        pin_desc(dq);
        pin_desc(dk);
        wg_fence();
        wgmma_qk_all(s, dq, dk);
        wg_commit();
        wg_wait<0>();
        pin(s);
    }
    if (ntiles == 1) softmax_tile<true, BN>(s, 0, sk, tig, scale_log2, row_max, row_sum, alpha, pa);
    else softmax_tile<false, BN>(s, 0, sk, tig, scale_log2, row_max, row_sum, alpha, pa);

    // Every tile but the last: S(t+1) and P(t) V(t) in flight together, P in two register
    // sets used in turn (a copy from one to the other lets ptxas merge them, and it then
    // serializes every wgmma of the kernel, warning C7513).
    const Fa90Loop<BN> loop{k, v, k_ss, v_ss, sk, ntiles, tid, tig, scale_log2, ks, vs, q_desc, k_desc, v_desc};
    int t = 0;
    for (;;) {
        if (t + 1 == ntiles) { loop.last(t, acc, pa); break; }
        loop.step(t++, s, acc, pa, pn, row_max, row_sum);
        if (t + 1 == ntiles) { loop.last(t, acc, pn); break; }
        loop.step(t++, s, acc, pn, pa, row_max, row_sum);
    }
    cp_async_wait_all();

    // ---- epilogue: O / l straight to global memory (4-byte stores) ----
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = 1.f / l;
    }
    const int row = m0 + wg * 64 + wq * 16 + gid;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const int c = 8 * j + 2 * tig;
        if (row < sq)
            *reinterpret_cast<u32*>(o + (long long)row * o_ss + c) =
                pack2<true>(acc[4 * j] * inv[0], acc[4 * j + 1] * inv[0]);
        if (row + 8 < sq)
            *reinterpret_cast<u32*>(o + (long long)(row + 8) * o_ss + c) =
                pack2<true>(acc[4 * j + 2] * inv[1], acc[4 * j + 3] * inv[1]);
    }
}

// Grid: (ceil(Sq / 128), H, B); block: 256 threads (two warpgroups); dynamic shared memory:
// (128 + 4 * BN) * 128 * 2 + 1024 bytes (the +1024 aligns the tiles). BN = 64 keys per tile
// (fa90_fwd_bf16_d128) or 128 (..._n128: half the per-tile overhead, 64 more registers).
#define FA90_KERNEL(NAME, BN)                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 1)                                        \
        NAME(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,   \
             u16* __restrict__ o, int sq, int sk, int dact, long long q_sb, long long q_sh,     \
             long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,    \
             long long v_sh, long long v_ss, long long o_sb, long long o_sh, long long o_ss,    \
             float scale_log2) {                                                                \
        (void)dact; /* always 128: flash_attn.rs launches these only for head dim 128 */       \
        fa90_fwd_impl<BN>(q, k, v, o, sq, sk, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh,   \
                          v_ss, o_sb, o_sh, o_ss, scale_log2);                                 \
    }
FA90_KERNEL(fa90_fwd_bf16_d128, 64)
FA90_KERNEL(fa90_fwd_bf16_d128_n128, 128)
#endif  // FA_SM90
