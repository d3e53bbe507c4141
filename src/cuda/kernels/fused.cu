// Fused elementwise / normalisation kernels for bf16 on CUDA (compiled at run time by NVRTC;
// no #include, so no toolkit headers are needed where the binary runs).
//
// Each kernel reproduces the roundings of the PyTorch op sequence it replaces (spec §1): math
// in f32, a rounding to bf16 (round-to-nearest-even) wherever torch materialises a bf16
// tensor. They replace chains of candle ops that each read and write the whole tensor (and,
// for candle's broadcast binary ops, compute a strided index per element).

// Launch geometry: the one definition, read by the Rust launchers (src/cuda/launch.rs parses
// these lines) and by the CPU emulation's (tests/kernel_emu/fused_emu.cpp includes this file).
// FUSED_THREADS: threads per block of every kernel here; FUSED_WARPS_PER_BLOCK: warps per block
// of the one-warp-per-row kernels (rmsnorm_scale_bf16, rmsnorm_rope_bf16); GN_SPLITS: thread
// blocks of gn_partial_bf16 per (batch, group).
#define FUSED_THREADS 256
#define FUSED_WARPS_PER_BLOCK 8
#define GN_SPLITS 64

typedef unsigned short u16;
typedef unsigned int u32;

#define DEVI static __device__ __forceinline__

DEVI float bf2f(u16 v) { return __uint_as_float(((u32)v) << 16); }

// f32 -> bf16, round to nearest even (NaN kept quiet).
DEVI u16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

DEVI float silu_f32(float x) { return x / (1.0f + expf(-x)); }

// Eight (four) bf16 values moved as one 16-byte (8-byte) load/store: these kernels are
// memory-bound, and 2-byte accesses leave most of the bandwidth unused. Every kernel checks at
// run time that its rows are aligned (uniform per block or warp) and keeps a scalar path.
template <int N>
struct alignas(2 * N) Bf16xN {
    u16 v[N];
};
typedef Bf16xN<8> Bf16x8;
typedef Bf16xN<4> Bf16x4;  // a warp then covers a 128-wide head row at once
DEVI bool aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }
DEVI bool aligned8(const void* p) { return ((unsigned long long)p & 7) == 0; }
template <int N>
DEVI Bf16xN<N> ldv(const u16* p) {
#ifndef FLUX2_KERNEL_EMU
    return *reinterpret_cast<const Bf16xN<N>*>(p);
#else  // tests/kernel_emu: the same bytes, and a misaligned access aborts as on the GPU
    Bf16xN<N> r;
    emu_copy_aligned(&r, p, 2 * N);
    return r;
#endif
}
template <int N>
DEVI void stv(u16* p, const Bf16xN<N>& x) {
#ifndef FLUX2_KERNEL_EMU
    *reinterpret_cast<Bf16xN<N>*>(p) = x;
#else
    emu_copy_aligned(p, &x, 2 * N);
#endif
}

// out[i] = op(in[0][i], .., in[N-1][i]) for i < n, this thread taking i = first, first + step,
// ...: 8 elements per 16-byte access when n % 8 == 0 and every pointer is 16-byte aligned
// (uniform per block), one at a time otherwise. `op` gets the N input values of an element.
template <int N, class Op>
DEVI void map_bf16(const u16* const (&in)[N], u16* out, long long n, long long first,
                   long long step, const Op& op) {
    bool vec = (n & 7) == 0 && aligned16(out);
#pragma unroll
    for (int k = 0; k < N; ++k) vec = vec && aligned16(in[k]);
    u16 a[N];
    if (vec) {
        for (long long i = 8 * first; i < n; i += 8 * step) {
            Bf16x8 x[N];
#pragma unroll
            for (int k = 0; k < N; ++k) x[k] = ldv<8>(in[k] + i);
            Bf16x8 o;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
#pragma unroll
                for (int k = 0; k < N; ++k) a[k] = x[k].v[e];
                o.v[e] = op(a);
            }
            stv(out + i, o);
        }
        return;
    }
    for (long long i = first; i < n; i += step) {
#pragma unroll
        for (int k = 0; k < N; ++k) a[k] = in[k][i];
        out[i] = op(a);
    }
}

// The row-wise kernels below run one thread block per row (blockIdx.x = row) with the threads
// striding over the columns, so no per-element 64-bit division is needed.

// out[r] = [prefix[r, :d] | bf16( bf16(silu(u[r, j])) * u[r, F + j] ) for j < F]
// (torch: F.silu(x1) * x2, or with a prefix torch.cat([prefix, F.silu(x1) * x2], -1), the
// single-stream block's input of its output projection, without the separate cat pass).
// u rows start at u + r * row_stride (a view into a wider projection is fine); prefix is
// [rows, d] contiguous, or unused with d = 0.
struct SwigluOp {
    __device__ u16 operator()(const u16 (&a)[2]) const {
        return f2bf(bf2f(f2bf(silu_f32(bf2f(a[0])))) * bf2f(a[1]));
    }
};
struct CopyOp {
    __device__ u16 operator()(const u16 (&a)[1]) const { return a[0]; }
};
extern "C" __global__ void swiglu_bf16(const u16* __restrict__ u, const u16* __restrict__ prefix,
                                       u16* __restrict__ out, int d, int f, long long row_stride) {
    const long long r = blockIdx.x;
    u16* out_row = out + r * (d + f);
    if (d > 0) {
        const u16* const src[1] = {prefix + r * d};
        map_bf16(src, out_row, d, threadIdx.x, blockDim.x, CopyOp());
    }
    const u16* row = u + r * row_stride;
    const u16* const in[2] = {row, row + f};
    map_bf16(in, out_row + d, f, threadIdx.x, blockDim.x, SwigluOp());
}

// The text encoder's MLP activation (transformers Qwen3MLP: act_fn(gate_proj(x)) * up_proj(x)):
// out = bf16( bf16(silu(gate)) * up ), gate/up/out n contiguous elements each. One grid over
// the elements (grid-stride, 8 per 16-byte access where aligned).
extern "C" __global__ void silu_mul_bf16(const u16* __restrict__ gate, const u16* __restrict__ up,
                                         u16* __restrict__ out, long long n) {
    const u16* const in[2] = {gate, up};
    map_bf16(in, out, n, (long long)blockIdx.x * blockDim.x + threadIdx.x,
             (long long)gridDim.x * blockDim.x, SwigluOp());
}

// The text encoder's Qwen3RMSNorm over rows of d (transformers: x.float() *
// rsqrt(x.float().pow(2).mean(-1) + eps), rounded to bf16, then weight * that in bf16):
// out = bf16( w * bf16( x * rsqrt(mean(x^2) + eps) ) ). One warp per
// row (the rows are the hidden states, d = 2560, or one head's q/k, d = 128), x and out
// contiguous, w [d].
extern "C" __global__ void rmsnorm_scale_bf16(const u16* __restrict__ x, const u16* __restrict__ w,
                                              u16* __restrict__ out, long long rows, int d,
                                              float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together: the shuffles below stay full
    const u16* xr = x + row * d;
    u16* orow = out + row * d;
    float sq = 0.0f;
    for (int c = lane; c < d; c += 32) {
        const float v = bf2f(xr[c]);
        sq += v * v;
    }
    for (int mask = 16; mask > 0; mask >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, mask, 32);
    const float r = rsqrtf(sq / d + eps);
    for (int c = lane; c < d; c += 32) orow[c] = f2bf(bf2f(w[c]) * bf2f(f2bf(bf2f(xr[c]) * r)));
}

// out = bf16( bf16( x * bf16(1 + scale) ) + shift ), x [B, rows_per_batch, D] contiguous,
// scale/shift [B, D] contiguous (the modulation of batch element b).
DEVI u16 modulate_one(float x, u16 scale, u16 shift) {
    const float s1 = bf2f(f2bf(1.0f + bf2f(scale)));
    return f2bf(bf2f(f2bf(x * s1)) + bf2f(shift));
}
struct ModulateOp {
    __device__ u16 operator()(const u16 (&a)[3]) const { return modulate_one(bf2f(a[0]), a[1], a[2]); }
};
extern "C" __global__ void modulate_bf16(const u16* __restrict__ x, const u16* __restrict__ scale,
                                         const u16* __restrict__ shift, u16* __restrict__ out,
                                         long long rows_per_batch, int d) {
    const long long row = blockIdx.x, b = row / rows_per_batch;
    const u16* const in[3] = {x + row * d, scale + b * d, shift + b * d};
    map_bf16(in, out + row * d, d, threadIdx.x, blockDim.x, ModulateOp());
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
// `red` holds 32 floats of shared memory; the block must not be using it.
DEVI float block_sum(float v, float* red) {
    for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask, 32);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < warps ? red[lane] : 0.0f;
    for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask, 32);
    __syncthreads();  // red may be reused
    return v;
}

#define LN_MAX_PER_THREAD 16

// LayerNorm without affine (f32 statistics, two passes over the row held in registers: the
// mean, then the mean squared deviation, as accurate as torch's Welford; one rounding), then
// the modulation of modulate_bf16:
//   out = bf16( bf16( bf16(LN(x)) * bf16(1 + scale) ) + shift )
// x [B, rows_per_batch, D] contiguous, scale/shift [B, D] contiguous; D <= blockDim.x * 16.
// Register slot i of a thread holds column ln_col(i): with 16-byte accesses two chunks of 8
// columns (8 * (tid + j * blockDim) + e), else columns tid + i * blockDim.
DEVI int ln_col(bool vec, int i) {
    return vec ? 8 * (threadIdx.x + (i >> 3) * blockDim.x) + (i & 7) : threadIdx.x + i * blockDim.x;
}
extern "C" __global__ void layernorm_modulate_bf16(const u16* __restrict__ x,
                                                   const u16* __restrict__ scale,
                                                   const u16* __restrict__ shift,
                                                   u16* __restrict__ out, long long rows_per_batch,
                                                   int d, float eps) {
    __shared__ float red[32];
    long long row = blockIdx.x;
    long long b = row / rows_per_batch;
    const u16* xr = x + row * d;
    const u16* sc = scale + b * d;
    const u16* sh = shift + b * d;
    u16* orow = out + row * d;
    // 16-byte accesses as in map_bf16: D a multiple of 8, every row start aligned.
    const bool vec = (d & 7) == 0 && aligned16(xr) && aligned16(sc) && aligned16(sh) &&
                     aligned16(orow);
    float v[LN_MAX_PER_THREAD];
    if (vec) {
#pragma unroll
        for (int j = 0; j < LN_MAX_PER_THREAD / 8; ++j) {
            const int c0 = ln_col(true, 8 * j);
            Bf16x8 t;
            if (c0 < d) t = ldv<8>(xr + c0);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[8 * j + e] = c0 < d ? bf2f(t.v[e]) : 0.0f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < LN_MAX_PER_THREAD; ++i) {
            const int c = ln_col(false, i);
            v[i] = c < d ? bf2f(xr[c]) : 0.0f;
        }
    }
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_MAX_PER_THREAD; ++i) sum += v[i];
    const float mean = block_sum(sum, red) / d;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < LN_MAX_PER_THREAD; ++i) {
        const float dev = ln_col(vec, i) < d ? v[i] - mean : 0.0f;
        sq += dev * dev;
    }
    const float var = block_sum(sq, red) / d;
    const float rstd = rsqrtf(var + eps);
    if (vec) {
#pragma unroll
        for (int j = 0; j < LN_MAX_PER_THREAD / 8; ++j) {
            const int c0 = ln_col(true, 8 * j);
            if (c0 < d) {
                const Bf16x8 s = ldv<8>(sc + c0), t = ldv<8>(sh + c0);
                Bf16x8 o;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float ln = bf2f(f2bf((v[8 * j + e] - mean) * rstd));
                    o.v[e] = modulate_one(ln, s.v[e], t.v[e]);
                }
                stv(orow + c0, o);
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < LN_MAX_PER_THREAD; ++i) {
            const int c = ln_col(false, i);
            if (c < d) orow[c] = modulate_one(bf2f(f2bf((v[i] - mean) * rstd)), sc[c], sh[c]);
        }
    }
}

// out = bf16( x + bf16( y * gate ) )   (torch: x + gate * y, two roundings), x and y
// [B, rows_per_batch, D] contiguous, gate [B, D] contiguous.
struct GatedResidualOp {
    __device__ u16 operator()(const u16 (&a)[3]) const {
        return f2bf(bf2f(a[0]) + bf2f(f2bf(bf2f(a[1]) * bf2f(a[2]))));
    }
};
extern "C" __global__ void gated_residual_bf16(const u16* __restrict__ x, const u16* __restrict__ y,
                                               const u16* __restrict__ gate, u16* __restrict__ out,
                                               long long rows_per_batch, int d) {
    const long long row = blockIdx.x, b = row / rows_per_batch;
    const u16* const in[3] = {x + row * d, y + row * d, gate + b * d};
    map_bf16(in, out + row * d, d, threadIdx.x, blockDim.x, GatedResidualOp());
}

// Interleaved-pair RoPE on x [B, S, H, D] contiguous with f32 tables cos/sin [S, D/2]:
// (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) in f32, one rounding (diffusers' apply_rotary_emb).
extern "C" __global__ void rope_bshd_bf16(const u16* __restrict__ x, const float* __restrict__ cos_t,
                                          const float* __restrict__ sin_t, u16* __restrict__ out,
                                          long long pairs, int s_len, int h, int half_d) {
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs;
         p += (long long)gridDim.x * blockDim.x) {
        int k = (int)(p % half_d);
        long long t = p / half_d;          // (b, s, h) index
        int s = (int)((t / h) % s_len);
        float c = cos_t[(long long)s * half_d + k];
        float sn = sin_t[(long long)s * half_d + k];
        float x0 = bf2f(x[2 * p]);
        float x1 = bf2f(x[2 * p + 1]);
        out[2 * p] = f2bf(x0 * c - x1 * sn);
        out[2 * p + 1] = f2bf(x1 * c + x0 * sn);
    }
}

// ---- q/k RMSNorm + RoPE in one pass, over one or two token segments.
// out [B, S0+S1, H, D] contiguous; token s < S0 reads x0[b, s, h, :], else x1[b, s-S0, h, :]
// (each through its own (batch, token, head) element strides, last dim contiguous, so views
// into wider projections need no copy) and normalises with w0 / w1 (f32, [D]).
// Per row: candle's rms_norm arithmetic (lane-strided sum of squares, warp reduce,
// rsqrtf(sum/D + eps), bf16(scale * x * w): the weight applied in f32, one rounding), then
// the rope_bshd_bf16 arithmetic on the rounded values with table row s (one rounding).
// One warp per (b, s, h) row; D % 32 == 0 (each lane owns columns lane, lane+32, ...; the
// RoPE partner of column c is c ^ 1, held by lane ^ 1). Rows with D % 128 == 0 (up to
// 128 * RR_MAX_CHUNKS) and 8-byte aligned starts take a vectorised path instead.
#define RR_MAX_CHUNKS 2
extern "C" __global__ void rmsnorm_rope_bf16(
    const u16* __restrict__ x0, const u16* __restrict__ x1, const float* __restrict__ w0,
    const float* __restrict__ w1, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, u16* __restrict__ out, long long rows, int s0, int s_len,
    int h, int d, long long x0_sb, long long x0_ss, long long x0_sh, long long x1_sb,
    long long x1_ss, long long x1_sh, float eps) {
    int lane = threadIdx.x & 31;
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps exit together
    int hh = (int)(row % h);
    long long t = row / h;
    int s = (int)(t % s_len);
    long long b = t / s_len;
    const u16* xr;
    const float* w;
    if (s < s0) {
        xr = x0 + b * x0_sb + (long long)s * x0_ss + (long long)hh * x0_sh;
        w = w0;
    } else {
        xr = x1 + b * x1_sb + (long long)(s - s0) * x1_ss + (long long)hh * x1_sh;
        w = w1;
    }
    const int half_d = d >> 1;
    const float* cos_row = cos_t + (long long)s * half_d;
    const float* sin_row = sin_t + (long long)s * half_d;
    u16* orow = out + row * d;
    if ((d & 127) == 0 && d <= 4 * RR_MAX_CHUNKS * 32 && aligned8(xr) && aligned8(orow)) {
        // 8-byte accesses: lane owns columns 128 j + 4 lane + {0..3}, i.e. two whole RoPE
        // pairs per chunk, so no shuffle is needed for the rotation.
        float xv[RR_MAX_CHUNKS][4];
        float tmp = 0.0f;
#pragma unroll
        for (int j = 0; j < RR_MAX_CHUNKS; ++j) {
            if (128 * j < d) {
                const Bf16x4 t = ldv<4>(xr + 128 * j + 4 * lane);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    xv[j][e] = bf2f(t.v[e]);
                    tmp += xv[j][e] * xv[j][e];
                }
            }
        }
        for (int mask = 16; mask > 0; mask >>= 1) tmp += __shfl_xor_sync(0xffffffffu, tmp, mask, 32);
        const float scale = rsqrtf(tmp / d + eps);
#pragma unroll
        for (int j = 0; j < RR_MAX_CHUNKS; ++j) {
            if (128 * j < d) {
                const int col = 128 * j + 4 * lane;
                Bf16x4 o;
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const float y0 = bf2f(f2bf(scale * xv[j][2 * m] * w[col + 2 * m]));
                    const float y1 = bf2f(f2bf(scale * xv[j][2 * m + 1] * w[col + 2 * m + 1]));
                    const int k = (col >> 1) + m;
                    const float c = cos_row[k], sn = sin_row[k];
                    o.v[2 * m] = f2bf(y0 * c - y1 * sn);
                    o.v[2 * m + 1] = f2bf(y1 * c + y0 * sn);
                }
                stv(orow + col, o);
            }
        }
        return;
    }
    float tmp = 0.0f;
    for (int col = lane; col < d; col += 32) {
        const float xi = bf2f(xr[col]);
        tmp += xi * xi;
    }
    for (int mask = 16; mask > 0; mask >>= 1) tmp += __shfl_xor_sync(0xffffffffu, tmp, mask, 32);
    const float mean = tmp / d;
    const float scale = rsqrtf(mean + eps);
    for (int col = lane; col < d; col += 32) {
        float y = bf2f(f2bf(scale * bf2f(xr[col]) * w[col]));
        float partner = __shfl_xor_sync(0xffffffffu, y, 1, 32);
        int k = col >> 1;
        float c = cos_row[k];
        float sn = sin_row[k];
        float r = (col & 1) ? (y * c + partner * sn) : (y * c - partner * sn);
        orow[col] = f2bf(r);
    }
}

// ---- GroupNorm (+ SiLU) over x [B, C, HW] contiguous, G groups (each group is a contiguous
// span of (C/G)·HW elements). Three passes: partial Welford statistics per (group, split),
// their combination into mean / rstd, and the normalise-affine(-SiLU) pass.

#define GN_THREADS FUSED_THREADS  // gn_partial_bf16's block: one shared slot per thread

DEVI void welford_combine(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
    if (nb == 0.0f) return;
    float nn = n + nb;
    float delta = meanb - mean;
    mean += delta * (nb / nn);
    m2 += m2b + delta * delta * (n * nb / nn);
    n = nn;
}

// grid (B*G, splits); partial[(bg * splits + split) * 3 + {0,1,2}] = (count, mean, m2)
extern "C" __global__ void gn_partial_bf16(const u16* __restrict__ x, float* __restrict__ partial,
                                           long long group_len, int splits) {
    int bg = blockIdx.x;
    int split = blockIdx.y;
    const u16* g = x + (long long)bg * group_len;
    // 16-byte loads when the group is 8-aligned (uniform per block): one Welford update per
    // 8 values (their mean and squared deviations in registers, then a combine) instead of a
    // division per value; the split boundaries are then multiples of 8.
    const bool vec = (group_len & 7) == 0 && aligned16(g);
    long long chunk = (group_len + splits - 1) / splits;
    if (vec) chunk = (chunk + 7) & ~7LL;
    long long start = (long long)split * chunk;
    long long end = start + chunk < group_len ? start + chunk : group_len;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    if (vec) {
        for (long long i = start + 8 * threadIdx.x; i < end; i += 8 * blockDim.x) {
            const Bf16x8 v = ldv<8>(g + i);
            float f[8], sum = 0.0f, sq = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += (f[e] = bf2f(v.v[e]));
            const float m = sum * 0.125f;
#pragma unroll
            for (int e = 0; e < 8; ++e) sq += (f[e] - m) * (f[e] - m);
            welford_combine(n, mean, m2, 8.0f, m, sq);
        }
    } else {
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            float v = bf2f(g[i]);
            n += 1.0f;
            float delta = v - mean;
            mean += delta / n;
            m2 += delta * (v - mean);
        }
    }
    __shared__ float sn[GN_THREADS], smean[GN_THREADS], sm2[GN_THREADS];
    sn[threadIdx.x] = n;
    smean[threadIdx.x] = mean;
    sm2[threadIdx.x] = m2;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float a = sn[threadIdx.x], b = smean[threadIdx.x], c = sm2[threadIdx.x];
            welford_combine(a, b, c, sn[threadIdx.x + stride], smean[threadIdx.x + stride],
                            sm2[threadIdx.x + stride]);
            sn[threadIdx.x] = a;
            smean[threadIdx.x] = b;
            sm2[threadIdx.x] = c;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float* o = partial + ((long long)bg * splits + split) * 3;
        o[0] = sn[0];
        o[1] = smean[0];
        o[2] = sm2[0];
    }
}

// stats[bg * 2 + {0,1}] = (mean, rstd) with the biased variance, as torch's GroupNorm.
extern "C" __global__ void gn_finalize(const float* __restrict__ partial, float* __restrict__ stats,
                                       int groups_total, int splits, float eps) {
    int bg = blockIdx.x * blockDim.x + threadIdx.x;
    if (bg >= groups_total) return;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* p = partial + ((long long)bg * splits + s) * 3;
        welford_combine(n, mean, m2, p[0], p[1], p[2]);
    }
    float var = n > 0.0f ? m2 / n : 0.0f;
    stats[bg * 2] = mean;
    stats[bg * 2 + 1] = rsqrtf(var + eps);
}

// y = bf16((x - mean) * rstd * w[c] + b[c]); with silu: bf16(silu(y)).
struct GroupNormApplyOp {
    float mean, rstd, w, b;
    int silu;
    __device__ u16 operator()(const u16 (&a)[1]) const {
        const u16 r = f2bf((bf2f(a[0]) - mean) * rstd * w + b);
        return silu ? f2bf(silu_f32(bf2f(r))) : r;
    }
};
// grid (blocks over H*W, B*C): blockIdx.y is one (batch, channel) plane, so the channel and
// group come from one 32-bit division per block, not three 64-bit ones per element.
extern "C" __global__ void gn_apply_bf16(const u16* __restrict__ x, const float* __restrict__ stats,
                                         const float* __restrict__ w, const float* __restrict__ bias,
                                         u16* __restrict__ out, int c, long long hw, int groups,
                                         int silu) {
    const int bc = blockIdx.y;
    const int ch = bc % c;
    const int bg = (bc / c) * groups + ch / (c / groups);
    const GroupNormApplyOp op{stats[bg * 2], stats[bg * 2 + 1], w[ch], bias[ch], silu};
    const u16* const in[1] = {x + (long long)bc * hw};
    map_bf16(in, out + (long long)bc * hw, hw, blockIdx.x * (long long)blockDim.x + threadIdx.x,
             (long long)gridDim.x * blockDim.x, op);
}

// out[b, c, :] = bf16(x[b, c, :] + bias[c]) for x [B, C, HW] contiguous: the bias of a
// convolution, added after cuDNN rounded the conv output (as torch's nn.Conv2d does).
// grid (blocks over HW, B*C) as gn_apply_bf16.
struct AddOp {
    float b;
    __device__ u16 operator()(const u16 (&a)[1]) const { return f2bf(bf2f(a[0]) + b); }
};
extern "C" __global__ void channel_bias_bf16(const u16* __restrict__ x, const u16* __restrict__ bias,
                                             u16* __restrict__ out, int c, long long hw) {
    const int bc = blockIdx.y;
    const u16* const in[1] = {x + (long long)bc * hw};
    map_bf16(in, out + (long long)bc * hw, hw, blockIdx.x * (long long)blockDim.x + threadIdx.x,
             (long long)gridDim.x * blockDim.x, AddOp{bf2f(bias[bc % c])});
}
