// src/cuda/kernels/fused.cu compiled for the CPU (cuda_cpu.hpp), with C entry points that launch
// each kernel exactly as src/cuda/fused/ does: the grids of src/cuda/launch.rs, with the block
// geometry (FUSED_THREADS, FUSED_WARPS_PER_BLOCK, GN_SPLITS) taken from fused.cu's own
// #defines, which the Rust side reads too.
#include "cuda_cpu.hpp"

#define FLUX2_KERNEL_EMU 1
#include "../../src/cuda/kernels/fused.cu"

namespace {
constexpr unsigned THREADS = FUSED_THREADS;
constexpr unsigned WARPS = FUSED_WARPS_PER_BLOCK;

Dim3 grid_for(long long n) {  // launch.rs grid_for
    long long blocks = (n + THREADS - 1) / THREADS;
    blocks = blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks);
    return Dim3{(unsigned)blocks, 1, 1};
}
}  // namespace

extern "C" {

// prefix: [rows, d] (d = 0: none); out rows are d + f wide.
void emu_swiglu(const u16* u, const u16* prefix, u16* out, int d, int f, long long row_stride,
                long long rows) {
    emu_launch(Dim3{(unsigned)rows, 1, 1}, THREADS,
               [&] { swiglu_bf16(u, prefix, out, d, f, row_stride); });
}

// which: 0 modulate, 1 layernorm_modulate, 2 gated_residual (fused/pointwise.rs RowWise).
void emu_row_wise(int which, const u16* a, const u16* b, const u16* c, u16* out, long long batch,
                  long long rows_per_batch, int d, float eps) {
    emu_launch(Dim3{(unsigned)(batch * rows_per_batch), 1, 1}, THREADS, [&] {
        if (which == 0) modulate_bf16(a, b, c, out, rows_per_batch, d);
        if (which == 1) layernorm_modulate_bf16(a, b, c, out, rows_per_batch, d, eps);
        if (which == 2) gated_residual_bf16(a, b, c, out, rows_per_batch, d);
    });
}

void emu_rope_bshd(const u16* x, const float* cos_t, const float* sin_t, u16* out,
                   long long pairs, int s_len, int h, int half_d) {
    emu_launch(grid_for(pairs), THREADS,
               [&] { rope_bshd_bf16(x, cos_t, sin_t, out, pairs, s_len, h, half_d); });
}

// strides: x0 (batch, token, head), then x1 (batch, token, head), in elements.
void emu_rmsnorm_rope(const u16* x0, const u16* x1, const float* w0, const float* w1,
                      const float* cos_t, const float* sin_t, u16* out, long long rows, int s0,
                      int s_len, int h, int d, const long long* strides, float eps) {
    emu_launch(Dim3{(unsigned)((rows + WARPS - 1) / WARPS), 1, 1}, WARPS * 32, [&] {
        rmsnorm_rope_bf16(x0, x1, w0, w1, cos_t, sin_t, out, rows, s0, s_len, h, d, strides[0],
                          strides[1], strides[2], strides[3], strides[4], strides[5], eps);
    });
}

void emu_group_norm(const u16* x, const float* w, const float* bias, u16* out, int b, int c,
                    long long hw, int g, float eps, int silu) {
    const long long group_len = (long long)(c / g) * hw;
    std::vector<float> partial((size_t)b * g * GN_SPLITS * 3), stats((size_t)b * g * 2);
    emu_launch(Dim3{(unsigned)(b * g), GN_SPLITS, 1}, THREADS,
               [&] { gn_partial_bf16(x, partial.data(), group_len, GN_SPLITS); });
    emu_launch(grid_for(b * g), THREADS,
               [&] { gn_finalize(partial.data(), stats.data(), b * g, GN_SPLITS, eps); });
    long long per_plane = (hw + THREADS * 4 - 1) / (THREADS * 4);
    per_plane = per_plane < 1 ? 1 : (per_plane > (1 << 16) ? (1 << 16) : per_plane);
    emu_launch(Dim3{(unsigned)per_plane, (unsigned)(b * c), 1}, THREADS, [&] {
        gn_apply_bf16(x, stats.data(), w, bias, out, c, hw, g, silu);
    });
}

void emu_silu_mul(const u16* gate, const u16* up, u16* out, long long n) {
    emu_launch(grid_for((n + 7) / 8), THREADS, [&] { silu_mul_bf16(gate, up, out, n); });
}

void emu_rmsnorm_scale(const u16* x, const u16* w, u16* out, long long rows, int d, float eps) {
    emu_launch(Dim3{(unsigned)((rows + WARPS - 1) / WARPS), 1, 1}, WARPS * 32,
               [&] { rmsnorm_scale_bf16(x, w, out, rows, d, eps); });
}

void emu_channel_bias(const u16* x, const u16* bias, u16* out, int b, int c, long long hw) {
    long long per_plane = (hw + THREADS * 4 - 1) / (THREADS * 4);
    per_plane = per_plane < 1 ? 1 : (per_plane > (1 << 16) ? (1 << 16) : per_plane);
    emu_launch(Dim3{(unsigned)per_plane, (unsigned)(b * c), 1}, THREADS,
               [&] { channel_bias_bf16(x, bias, out, c, hw); });
}
}
