// The fused kernels of src/cuda/kernels/fused.cu on the CPU without Python (run by
// tests/kernel_emulation.rs): fused_emu.cpp's launchers (as src/cuda/fused/ launches them) on
// deterministic inputs, against the op sequences they replace computed here with torch's
// roundings (f32 math, bf16 rounding after every op torch materialises; the norms' statistics
// in double). Both the 16-byte and the scalar paths. Exit code 1 on a failure.
// (check_fused.py compares with PyTorch's own ops.)
#include <algorithm>
#include <cstdio>
#include <vector>

#include "fused_emu.cpp"
#include "selftest_rng.hpp"

namespace {
Rng rng{0x243F6A8885A308D3ULL};

float b2f(u16 v) { return bf2f(v); }
u16 rb(float f) { return f2bf(f); }         // round to bf16
float r(float f) { return bf2f(f2bf(f)); }  // value after a bf16 rounding
float silu(float x) { return x / (1.0f + std::exp(-x)); }

std::vector<u16> randv(size_t n, float scale = 1.0f, float shift = 0.0f) {
    std::vector<u16> v(n);
    for (auto& x : v) x = rb(rng.normal() * scale + shift);
    return v;
}

bool failed = false;

// got == want except for at most `frac` of the elements, which may be off by `tol_rel` times
// the largest |want| (norm statistics are summed in another order than the reference's).
void check(const char* name, const std::vector<u16>& got, const std::vector<u16>& want, double frac = 0,
           double tol_rel = 0) {
    double max_want = 0, worst = 0;
    size_t differ = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        max_want = std::max(max_want, (double)std::fabs(b2f(want[i])));
        if (got[i] != want[i]) {
            ++differ;
            worst = std::max(worst, (double)std::fabs(b2f(got[i]) - b2f(want[i])));
        }
    }
    const bool ok = differ <= frac * want.size() && worst <= tol_rel * max_want;
    std::printf("%s %-44s %zu of %zu differ, max %.3g\n", ok ? "ok  " : "FAIL", name, differ, want.size(), worst);
    failed |= !ok;
}

// With d > 0 the output rows are [prefix | swiglu] (the single-stream block's cat).
void swiglu(int rows, int f, int pad, int offset, int d = 0) {
    const int stride = 2 * f + pad, w = d + f;
    std::vector<u16> buf = randv((size_t)rows * stride + offset + 8), out((size_t)rows * w), want(out.size());
    std::vector<u16> prefix = randv((size_t)rows * d + 1);
    const u16* u = buf.data() + offset;
    for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < d; ++j) want[(size_t)i * w + j] = prefix[(size_t)i * d + j];
        for (int j = 0; j < f; ++j)
            want[(size_t)i * w + d + j] =
                rb(r(silu(b2f(u[(size_t)i * stride + j]))) * b2f(u[(size_t)i * stride + f + j]));
    }
    emu_swiglu(u, prefix.data(), out.data(), d, f, stride, rows);
    char name[80];
    std::snprintf(name, sizeof name, "swiglu_bf16 F=%d stride %d offset %d prefix %d", f, stride, offset, d);
    check(name, out, want);
}

void row_wise(int d) {
    const int b = 2, n = 5;
    std::vector<u16> x = randv((size_t)b * n * d, 2.0f, 1.0f), y = randv(x.size()), out(x.size()), want(x.size());
    std::vector<u16> scale = randv((size_t)b * d, 0.3f), shift = randv(scale.size(), 0.3f), gate = randv(scale.size());
    auto mod = [&](float v, size_t bi, int c) {
        return rb(r(v * r(1.0f + b2f(scale[bi * d + c]))) + b2f(shift[bi * d + c]));
    };
    char name[64];
    for (int bi = 0; bi < b; ++bi)
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < d; ++c) want[((size_t)bi * n + i) * d + c] = mod(b2f(x[((size_t)bi * n + i) * d + c]), bi, c);
    emu_row_wise(0, x.data(), scale.data(), shift.data(), out.data(), b, n, d, 0);
    std::snprintf(name, sizeof name, "modulate_bf16 D=%d", d);
    check(name, out, want);

    for (int bi = 0; bi < b; ++bi)
        for (int i = 0; i < n; ++i) {
            const u16* xr = &x[((size_t)bi * n + i) * d];
            double mean = 0, var = 0;
            for (int c = 0; c < d; ++c) mean += b2f(xr[c]);
            mean /= d;
            for (int c = 0; c < d; ++c) var += (b2f(xr[c]) - mean) * (b2f(xr[c]) - mean);
            const double rstd = 1.0 / std::sqrt(var / d + 1e-6);
            for (int c = 0; c < d; ++c)
                want[((size_t)bi * n + i) * d + c] = mod(r((float)((b2f(xr[c]) - mean) * rstd)), bi, c);
        }
    emu_row_wise(1, x.data(), scale.data(), shift.data(), out.data(), b, n, d, 1e-6f);
    std::snprintf(name, sizeof name, "layernorm_modulate_bf16 D=%d", d);
    check(name, out, want, 0.01, 0.02);

    for (int bi = 0; bi < b; ++bi)
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < d; ++c) {
                const size_t k = ((size_t)bi * n + i) * d + c;
                want[k] = rb(b2f(x[k]) + r(b2f(y[k]) * b2f(gate[bi * d + c])));
            }
    emu_row_wise(2, x.data(), y.data(), gate.data(), out.data(), b, n, d, 0);
    std::snprintf(name, sizeof name, "gated_residual_bf16 D=%d", d);
    check(name, out, want);
}

void rmsnorm_rope(int d) {
    const int b = 2, h = 3, s0 = 4, s1 = 7, s = s0 + s1;
    // Segment views into fused projections: [B, S0, 3, H, D] (index 1) and [B, S1, H, 5, D]
    // (index 2), as the transformer passes them.
    std::vector<u16> p0 = randv((size_t)b * s0 * 3 * h * d, 2.0f), p1 = randv((size_t)b * s1 * h * 5 * d, 2.0f);
    const u16* x0 = p0.data() + (size_t)h * d;
    const u16* x1 = p1.data() + 2 * (size_t)d;
    const long long st[6] = {(long long)s0 * 3 * h * d, 3LL * h * d, d, (long long)s1 * h * 5 * d, 5LL * h * d, 5LL * d};
    std::vector<float> w0(d), w1(d), cs((size_t)s * d / 2), sn(cs.size());
    for (auto& v : w0) v = 0.5f + (float)rng.uniform();
    for (auto& v : w1) v = 0.5f + (float)rng.uniform();
    for (size_t i = 0; i < cs.size(); ++i) {
        const double a = rng.normal() * 3;
        cs[i] = (float)std::cos(a), sn[i] = (float)std::sin(a);
    }
    std::vector<u16> out((size_t)b * s * h * d), want(out.size());
    for (int bi = 0; bi < b; ++bi)
        for (int t = 0; t < s; ++t)
            for (int hh = 0; hh < h; ++hh) {
                const u16* xr = t < s0 ? x0 + bi * st[0] + t * st[1] + hh * st[2]
                                       : x1 + bi * st[3] + (t - s0) * st[4] + hh * st[5];
                const float* w = t < s0 ? w0.data() : w1.data();
                double ss = 0;
                for (int c = 0; c < d; ++c) ss += (double)b2f(xr[c]) * b2f(xr[c]);
                const float scale = (float)(1.0 / std::sqrt(ss / d + 1e-6));
                u16* o = &want[(((size_t)bi * s + t) * h + hh) * d];
                for (int c = 0; c < d; c += 2) {
                    const float y0 = r(scale * b2f(xr[c]) * w[c]), y1 = r(scale * b2f(xr[c + 1]) * w[c + 1]);
                    const float cc = cs[(size_t)t * d / 2 + c / 2], sv = sn[(size_t)t * d / 2 + c / 2];
                    o[c] = rb(y0 * cc - y1 * sv);
                    o[c + 1] = rb(y1 * cc + y0 * sv);
                }
            }
    emu_rmsnorm_rope(x0, x1, w0.data(), w1.data(), cs.data(), sn.data(), out.data(), (long long)b * s * h, s0, s,
                     h, d, st, 1e-6f);
    char name[64];
    std::snprintf(name, sizeof name, "rmsnorm_rope_bf16 D=%d (two strided segments)", d);
    check(name, out, want, 0.01, 1.0 / 256);
}

void group_norm(int hh, int ww, int silu_on, int c = 16, int g = 4) {
    const int b = 1, hw = hh * ww;
    std::vector<u16> x = randv((size_t)b * c * hw, 3.0f, 1.5f), out(x.size()), want(x.size());
    std::vector<float> w(c), bias(c);
    for (auto& v : w) v = 0.5f + (float)rng.uniform();
    for (auto& v : bias) v = rng.normal() * 0.1f;
    const int cg = c / g;
    for (int bi = 0; bi < b; ++bi)
        for (int gi = 0; gi < g; ++gi) {
            const u16* xs = &x[((size_t)bi * c + gi * cg) * hw];
            double mean = 0, var = 0;
            for (int i = 0; i < cg * hw; ++i) mean += b2f(xs[i]);
            mean /= cg * hw;
            for (int i = 0; i < cg * hw; ++i) var += (b2f(xs[i]) - mean) * (b2f(xs[i]) - mean);
            const float rstd = (float)(1.0 / std::sqrt(var / (cg * hw) + 1e-6));
            for (int i = 0; i < cg * hw; ++i) {
                const int ch = gi * cg + i / hw;
                const u16 yv = rb((b2f(xs[i]) - (float)mean) * rstd * w[ch] + bias[ch]);
                want[((size_t)bi * c + gi * cg) * hw + i] = silu_on ? rb(silu(b2f(yv))) : yv;
            }
        }
    emu_group_norm(x.data(), w.data(), bias.data(), out.data(), b, c, hw, g, 1e-6f, silu_on);
    char name[64];
    std::snprintf(name, sizeof name, "group_norm %dx%d silu=%d", hh, ww, silu_on);
    check(name, out, want, 0.01, 0.02);
}

void channel_bias(int hh, int ww) {
    const int b = 2, c = 24, hw = hh * ww;
    std::vector<u16> x = randv((size_t)b * c * hw, 3.0f), bias = randv(c), out(x.size()), want(x.size());
    for (size_t i = 0; i < x.size(); ++i) want[i] = rb(b2f(x[i]) + b2f(bias[(i / hw) % c]));
    emu_channel_bias(x.data(), bias.data(), out.data(), b, c, hw);
    char name[64];
    std::snprintf(name, sizeof name, "channel_bias_bf16 %dx%d", hh, ww);
    check(name, out, want);
}
}  // namespace

int main() {
    swiglu(13, 304, 8, 0);  // 16-byte path
    swiglu(13, 300, 6, 0);  // F % 8 != 0: scalar
    swiglu(5, 304, 8, 1);   // misaligned rows: scalar
    swiglu(7, 304, 8, 0, 96);  // with a prefix (single-stream cat), 16-byte paths
    swiglu(7, 304, 8, 0, 36);  // prefix rows not 16-byte aligned: scalar paths
    row_wise(3040);         // 16-byte path
    row_wise(3036);         // scalar
    rmsnorm_rope(128);      // 8-byte path
    rmsnorm_rope(256);      // 8-byte path, two chunks per lane
    rmsnorm_rope(96);       // scalar
    for (int silu_on = 0; silu_on < 2; ++silu_on) group_norm(9, 13, silu_on), group_norm(8, 16, silu_on);
    group_norm(256, 160, 0, 8, 2);  // 16-byte statistics path, two loads for some threads
    group_norm(61, 67, 1, 8, 2);    // the same size class on the scalar path
    channel_bias(9, 13);
    channel_bias(8, 16);
    return failed ? 1 : 0;
}
