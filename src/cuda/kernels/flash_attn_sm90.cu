// Hopper variant of the flash-attention kernel (flash_attn.cu): the same algorithm with
// warpgroup MMAs (wgmma.mma_async) instead of mma.sync, bf16, head dim 128, for compute_90a.
// NVRTC compiles it appended to flash_attn.cu (whose helpers it uses: cp.async, cvt, exp2,
// shared addresses), with -DFA_ONLY_D=0 so that none of the mma.sync kernels is built with it
// (attention/select.rs HOPPER_SOURCE). A block of two warpgroups owns 128 query rows (64 per
// warpgroup); K/V tiles of BN keys (64 or 128) are double buffered with cp.async. S = Q K^T reads Q and K straight from shared memory through matrix descriptors; P V
// takes P from registers (the S accumulator layout is the A-fragment layout) and V from shared
// memory, N-major (imm-trans-b). Shared-memory tiles use the canonical 128-byte-swizzle layout
// of the PTX ISA ("Shared Memory Matrix Layout"): the head dim in panels of 64 columns, each
// panel [rows][128 B] with 16-byte chunk c of row r stored at chunk c ^ (r & 7), panels and
// tiles 1024-byte aligned (descriptor base offset 0). One wgmma k-step (16 columns, 32 bytes)
// is the panel's descriptor start advanced by 32 bytes; the hardware applies the swizzle to the
// address bits. Per tile, S(t+1) = Q K(t+1)^T and O += P(t) V(t) are issued together and the
// softmax of S(t+1) runs while P(t) V(t) is still on the tensor cores (FlashAttention-3's
// intra-warpgroup overlap); K(t+2) and V(t+1) load meanwhile. The key tiles are visited last
// first (as FlashAttention-3 does): the one partial tile is the prologue's, so the main loop
// holds no key mask and no bounds-checked load. tests/kernel_emu emulates the
// instructions from the PTX ISA's definitions, asynchronously (a wgmma reads its operands when
// its group is waited for), so a missing wait or an early overwrite shows there too.
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

// The 64 f32 accumulators of an m64n128k16 wgmma: operands %0..%63 of its inline asm.
#define ACC64_REGS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define ACC64_OUTS(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d[64x128] = A[64x16] (descriptor, K-major) * B[16x128] (descriptor, K-major) (+ d when
// accumulate), bf16 -> f32: the S tile of the 128-key variant.
template <int ACCUMULATE>
DEVI void wgmma_qk(float (&d)[64], unsigned long long desc_a, unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        ACC64_REGS
        "}, %64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : ACC64_OUTS(d)
        : "l"(desc_a), "l"(desc_b), "n"(ACCUMULATE)
        : "memory");
}

// d[64x128] += A[64x16] (registers) * B[16x128] (descriptor, N-major), bf16 -> f32.
DEVI void wgmma_pv(float (&d)[64], const u32 (&a)[4], unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        ACC64_REGS
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
        "}\n"
        : ACC64_OUTS(d)
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
// Score s[idx] of an S tile of BN keys, -inf for keys past sk when MASKED (only the last key
// tile can hold them). s[4j + e]: row gid (e < 2) or gid + 8, key tile*BN + 8j + 2 tig + (e & 1).
template <bool MASKED, int BN>
DEVI float score(const float (&s)[BN / 2], int idx, int tile, int sk, int tig) {
    if (!MASKED) return s[idx];
    const int key = tile * BN + 8 * (idx >> 2) + 2 * tig + (idx & 1);
    return key < sk ? s[idx] : -__int_as_float(0x7f800000);
}

// Online softmax of one S tile (key tile `tile`) into the bf16 A fragments of P
// (pa[k-step][register]: register r + 2 (j & 1) of k-step j / 2 holds row r's pair of n-tile
// j), updating the row statistics; alpha gets each row's rescale factor for O, and the return
// value says whether any row of the warp moved its max. s is only read: ptxas serializes every
// wgmma of the kernel (warning C7513) if the registers of a wgmma's accumulator are written
// while another wgmma is in flight, and this runs while P V is.
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

// The tiles of fa90_fwd_impl's main loop (everything inlines into registers). Tile t (the
// order of processing) is key tile ntiles - 1 - t; its K and V go to buffer t & 1.
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

    // Descriptors of the 8 k-steps of S(tile) = Q K(tile)^T, K in buffer tile & 1: the
    // first k-step's plus each one's byte offset >> 4 in the start address field (14 bits: no
    // carry into the next field, shared memory is < 256 KiB).
    __device__ __forceinline__ void qk_descs(int tile, unsigned long long (&dq)[D / 16],
                                             unsigned long long (&dk)[D / 16]) const {
        const unsigned long long kbuf = (tile & 1) * (TILE / 16);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int panel = kk >> 2, off = (kk & 3) * 32;
            dq[kk] = q_desc + (panel * PANEL_Q + off) / 16;
            dk[kk] = k_desc + kbuf + (panel * PANEL_KV + off) / 16;
        }
    }
    // Descriptors of the BN / 16 k-steps of P V(tile), V in buffer tile & 1.
    __device__ __forceinline__ void v_descs(int tile, unsigned long long (&dv)[BN / 16]) const {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) dv[kk] = v_desc + (tile & 1) * (TILE / 16) + kk * (16 * 128 / 16);
    }

    // S(0) into s (K(0) loaded and visible).
    __device__ __forceinline__ void first(float (&s)[BN / 2]) const {
        unsigned long long dq[D / 16], dk[D / 16];
        qk_descs(0, dq, dk);
        pin_desc(dq);
        pin_desc(dk);
        wg_fence();
        wgmma_qk_all(s, dq, dk);
        wg_commit();
        wg_wait<0>();
        pin(s);
    }

    // Tile t < ntiles - 1: S(t+1) = Q K(t+1)^T and O += P(t) V(t) (P(t) in pc) in flight
    // together, the softmax of S(t+1) (into pn) while P V runs. Tiles t+1 and t+2 are full
    // (only tile 0 is partial): no mask, no bounds checks.
    __device__ __forceinline__ void step(int t, float (&s)[BN / 2], float (&acc)[64],
                                         u32 (&pc)[BN / 16][4], u32 (&pn)[BN / 16][4],
                                         float (&row_max)[2], float (&row_sum)[2]) const {
        // Everything loaded so far has landed (K(t+1), V(t)); both warpgroups are done with
        // S(t) and P(t-1) V(t-1), so K buffer t&1 and V buffer (t+1)&1 are free.
        cp_async_wait_all();
        fence_proxy_async();
        __syncthreads();
        const int key_tile = ntiles - 1 - t;  // of tile t; tile t+1 is key_tile - 1
        if (t + 2 < ntiles)
            load_panels<BN, true>(ks + (t & 1) * TILE, k, k_ss, (key_tile - 2) * BN, sk, tid);
        load_panels<BN, true>(vs + ((t + 1) & 1) * TILE, v, v_ss, (key_tile - 1) * BN, sk, tid);
        cp_async_commit();

        // All descriptors before the fence: ptxas serializes the wgmmas (warning C7513) when
        // their input registers are computed between the fence and the wait.
        unsigned long long dq[D / 16], dk[D / 16], dv[BN / 16];
        qk_descs(t + 1, dq, dk);
        v_descs(t, dv);
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
            softmax_tile<false, BN>(s, key_tile - 1, sk, tig, scale_log2, row_max, row_sum, alpha, pn);
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
        v_descs(t, dv);
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
    constexpr int D = Fa90Loop<BN>::D, BM = 128;
    constexpr int PANEL_KV = Fa90Loop<BN>::PANEL_KV, TILE = Fa90Loop<BN>::TILE;
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
    to_batch_head(q, k, v, o, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, o_sb, o_sh);
    const int ntiles = (sk + BN - 1) / BN;

    // Descriptors of the first k-step of each operand (Fa90Loop derives the others).
    const unsigned long long q_desc = sw128_desc(qs + wg * 64 * 128, 16, 1024);  // own 64 rows
    const unsigned long long k_desc = sw128_desc(ks, 16, 1024);
    // V is N-major: per the PTX ISA the leading byte offset steps along N (to the next 64
    // head-dim columns, a panel) and the stride byte offset along K (the next 8 keys).
    // FA90_V_OFFSETS_SWAPPED builds the other reading, for scripts/gpu/gpu_attention_check.sh to
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

    // Prologue: Q, tile 0 (the last key tile, the only partial one: bounds-checked and
    // masked) and K of tile 1, then S(0) and its softmax.
    const int last_key_tile = ntiles - 1;
    load_panels<BM, false>(qs, q, q_ss, m0, sq, tid);
    load_panels<BN, false>(ks, k, k_ss, last_key_tile * BN, sk, tid);
    load_panels<BN, false>(vs, v, v_ss, last_key_tile * BN, sk, tid);
    if (ntiles > 1) load_panels<BN, true>(ks + TILE, k, k_ss, (last_key_tile - 1) * BN, sk, tid);
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    const Fa90Loop<BN> loop{k, v, k_ss, v_ss, sk, ntiles, tid, tig, scale_log2, ks, vs, q_desc, k_desc, v_desc};
    loop.first(s);
    softmax_tile<true, BN>(s, last_key_tile, sk, tig, scale_log2, row_max, row_sum, alpha, pa);

    // Every tile but the last: S(t+1) and P(t) V(t) in flight together, P in two register
    // sets used in turn (a copy from one to the other lets ptxas merge them, and it then
    // serializes every wgmma of the kernel, warning C7513). The last tile's P V runs after
    // the loop, from the set that holds its P.
    int t = 0;
    bool p_in_pn = false;
    for (;;) {
        if (t + 1 == ntiles) break;
        loop.step(t++, s, acc, pa, pn, row_max, row_sum);
        if (t + 1 == ntiles) { p_in_pn = true; break; }
        loop.step(t++, s, acc, pn, pa, row_max, row_sum);
    }
    if (p_in_pn) loop.last(t, acc, pn);
    else loop.last(t, acc, pa);
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
        (void)dact; /* always 128: attention/ launches these only for head dim 128 */       \
        fa90_fwd_impl<BN>(q, k, v, o, sq, sk, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh,   \
                          v_ss, o_sb, o_sh, o_ss, scale_log2);                                 \
    }
FA90_KERNEL(fa90_fwd_bf16_d128, 64)
FA90_KERNEL(fa90_fwd_bf16_d128_n128, 128)
