// The flash-attention kernel on the CPU without Python (run by tests/kernel_emulation.rs):
// fa_emu.cpp's launcher on deterministic pseudo-random bf16/f16 inputs, against attention
// computed in double on the same rounded values; each line ends with a hash of the output
// bits (scripts/cuda/emulate-kernels.sh compares them with another revision's). Exit code 1 on a
// failure.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "fa_emu.cpp"
#include "selftest_rng.hpp"

namespace {

u16 to_half(float f, bool bf16) { return bf16 ? emu_f2bf(f) : emu_f2h(f); }
float from_half(u16 v, bool bf16) { return bf16 ? emu_bf16(v) : emu_f16(v); }

// One case: B, H, Sq, Sk, head dim, dtype, layout ([B,S,H,D] memory or [B,H,S,D]), sink key.
// sm90: the Hopper (wgmma) variant with sm90 keys per tile (64 or 128) instead (bf16, head
// dim 128 only).
// causal_valid > 0: the causal variant, query i sees key j iff j <= i and j < causal_valid,
// with `group` query heads per K/V head (bf16, head dim 64/128, Sq = Sk).
bool run_case(int b, int h, int sq, int sk, int dh, bool bf16, bool bshd, bool sink, Rng& rng,
              int sm90 = 0, int causal_valid = 0, int group = 1) {
    const int hk = h / group;  // K/V heads
    const int dk = dh <= 16 ? 16 : dh <= 32 ? 32 : dh <= 64 ? 64 : dh <= 128 ? 128 : 256;
    auto strides = [&](int s, int nh) {  // (batch, head, token) element strides
        return bshd ? std::vector<long long>{(long long)s * nh * dh, dh, (long long)nh * dh}
                    : std::vector<long long>{(long long)nh * s * dh, (long long)s * dh, dh};
    };
    auto fill = [&](int s, int nh, bool positive) {
        std::vector<u16> t((size_t)b * nh * s * dh);
        for (auto& v : t) {
            float x = rng.normal();
            v = to_half(positive && x < 0 ? -x : x, bf16);
        }
        return t;
    };
    std::vector<u16> q = fill(sq, h, sink), k = fill(sk, hk, false), v = fill(sk, hk, false),
                     o(q.size());
    const auto sq_st = strides(sq, h), sk_st = strides(sk, hk);
    auto at = [&](const std::vector<long long>& st, int bi, int hi, int si) {
        return bi * st[0] + hi * st[1] + si * st[2];
    };
    if (sink)  // key 0 scores highest for every query: later tiles skip the rescale
        for (int bi = 0; bi < b; ++bi)
            for (int hi = 0; hi < hk; ++hi)
                for (int e = 0; e < dh; ++e) k[at(sk_st, bi, hi, 0) + e] = to_half(0.5f, bf16);
    std::vector<long long> all;
    for (auto* st : {&sq_st, &sk_st, &sk_st, &sq_st}) all.insert(all.end(), st->begin(), st->begin() + 3);
    const double scale = 1.0 / std::sqrt((double)dh);
    const float scale_log2 = (float)(scale * 1.4426950408889634);
    int rc = 1;
#ifdef FA_HAS_SM90
    if (sm90) rc = emu_flash90(sm90, q.data(), k.data(), v.data(), o.data(), b, h, sq, sk, all.data(), scale_log2);
#endif
    if (causal_valid)
        rc = emu_flash_causal(dk, q.data(), k.data(), v.data(), o.data(), b, h, sq, sk, dh, all.data(),
                              scale_log2, causal_valid, group);
    else if (!sm90) rc = emu_flash(dk, bf16, q.data(), k.data(), v.data(), o.data(), b, h, sq, sk, dh, all.data(), scale_log2);
    if (rc != 0) {
        std::printf("FAIL no kernel for D=%d\n", dk);
        return false;
    }
    double worst = 0, ref_max = 0;
    std::vector<double> p(sk);
    for (int bi = 0; bi < b; ++bi)
        for (int hi = 0; hi < h; ++hi)
            for (int i = 0; i < sq; ++i) {
                const int kh = hi / group;
                // Keys this query sees: all, or (causal) 0..=min(i, causal_valid - 1).
                const int nk = causal_valid ? std::min(i + 1, causal_valid) : sk;
                double m = -1e300, l = 0;
                for (int j = 0; j < nk; ++j) {
                    double dot = 0;
                    for (int e = 0; e < dh; ++e)
                        dot += (double)from_half(q[at(sq_st, bi, hi, i) + e], bf16) *
                               from_half(k[at(sk_st, bi, kh, j) + e], bf16);
                    p[j] = dot * scale;
                    m = std::max(m, p[j]);
                }
                for (int j = 0; j < nk; ++j) l += (p[j] = std::exp(p[j] - m));
                for (int e = 0; e < dh; ++e) {
                    double r = 0;
                    for (int j = 0; j < nk; ++j) r += p[j] * from_half(v[at(sk_st, bi, kh, j) + e], bf16);
                    r /= l;
                    ref_max = std::max(ref_max, std::fabs(r));
                    worst = std::max(worst, std::fabs(r - from_half(o[at(sq_st, bi, hi, i) + e], bf16)));
                }
            }
    const bool ok = std::isfinite(worst) && worst <= 1e-3 + 8e-3 * ref_max;
    // FNV-1a of the output bits: emulate-kernels.sh compares it across kernel revisions.
    unsigned long long hash = 0xcbf29ce484222325ULL;
    for (u16 x : o) hash = (hash ^ x) * 0x100000001b3ULL;
    char variant[48] = "";
    if (causal_valid) std::snprintf(variant, sizeof variant, "-causal(valid=%d,group=%d)", causal_valid, group);
    std::printf("%s flash%s%s B=%d H=%d Sq=%d Sk=%d D=%d %s %s%s: max abs err %.2e, output %016llx\n",
                ok ? "ok  " : "FAIL", sm90 == 0 ? "" : sm90 == 64 ? "90" : "90/n128", variant, b, h, sq, sk, dh, bf16 ? "bf16" : "f16", bshd ? "bshd" : "bhsd",
                sink ? "+sink" : "", worst, hash);
    return ok;
}
}  // namespace

int main(int argc, char** argv) {
    Rng rng{0x9E3779B97F4A7C15ULL};
    bool ok = true;
#ifdef FA_HAS_SM90
    // `fa_selftest fuzz N`: N random shapes through both Hopper variants (not run in CI).
    if (argc == 3 && std::string(argv[1]) == "fuzz") {
        for (int i = 0, n = std::atoi(argv[2]); i < n; ++i) {
            const int b = 1 + (int)(rng.uniform() * 2), h = 1 + (int)(rng.uniform() * 2);
            const int sq = 1 + (int)(rng.uniform() * 300), sk = 1 + (int)(rng.uniform() * 600);
            const bool bshd = rng.uniform() < 0.5, sink = rng.uniform() < 0.2;
            for (int bn : {64, 128}) ok &= run_case(b, h, sq, sk, 128, true, bshd, sink, rng, bn);
            // The causal variant: sequence length, padding edge and GQA group at random.
            const int group = 1 << (int)(rng.uniform() * 3), sc = 1 + (int)(rng.uniform() * 400);
            const int valid = 1 + (int)(rng.uniform() * sc), dc = rng.uniform() < 0.7 ? 128 : 64;
            ok &= run_case(b, h * group, sc, sc, dc, true, bshd, sink, rng, 0, valid, group);
        }
        return ok ? 0 : 1;
    }
#endif
    (void)argc, (void)argv;
    ok &= run_case(1, 2, 200, 130, 128, true, false, false, rng);  // 2 query blocks, partial tile
    ok &= run_case(1, 1, 100, 400, 128, true, true, true, rng);    // no-rescale path
    ok &= run_case(2, 1, 70, 64, 64, true, true, false, rng);      // one full key tile
    ok &= run_case(1, 1, 40, 100, 96, true, false, false, rng);    // D=96 in the D=128 kernel
    ok &= run_case(1, 1, 70, 90, 256, true, false, false, rng);
    ok &= run_case(1, 2, 33, 1, 8, true, false, false, rng);
    ok &= run_case(1, 1, 130, 150, 128, false, true, false, rng);  // f16
    // The causal variant (Qwen3 in the text encoder): right padding at several lengths (inside
    // the first key tile, on a tile edge, past the first query block, none), GQA groups, both
    // layouts, several query blocks, a lone key.
    ok &= run_case(1, 4, 200, 200, 128, true, false, false, rng, 0, 26, 4);
    ok &= run_case(1, 4, 200, 200, 128, true, true, false, rng, 0, 64, 2);
    ok &= run_case(2, 2, 300, 300, 128, true, true, false, rng, 0, 150, 1);
    ok &= run_case(1, 2, 130, 130, 128, true, false, true, rng, 0, 130, 2);
    ok &= run_case(1, 2, 70, 70, 64, true, true, false, rng, 0, 65, 2);
    ok &= run_case(1, 1, 9, 9, 128, true, false, false, rng, 0, 1, 1);
    ok &= run_case(2, 4, 77, 77, 8, true, true, false, rng, 0, 13, 2);  // the tiny fixtures' D=8
#ifdef FA_HAS_SM90
    // The Hopper variant: two query blocks with a partial one, a partial last key tile, both
    // layouts, the no-rescale path, one key.
    for (int bn : {64, 128}) {
        ok &= run_case(1, 2, 200, 130, 128, true, false, false, rng, bn);
        ok &= run_case(1, 1, 100, 400, 128, true, true, true, rng, bn);
        ok &= run_case(2, 1, 64, 64, 128, true, true, false, rng, bn);
        ok &= run_case(1, 1, 5, 1, 128, true, false, false, rng, bn);
        ok &= run_case(1, 1, 130, 700, 128, true, true, false, rng, bn);  // 6 and 11 key tiles
    }
#endif
    return ok ? 0 : 1;
}
