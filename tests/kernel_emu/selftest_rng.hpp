// Deterministic inputs for the C++ kernel self-tests (fa_selftest.cpp, fused_selftest.cpp).
#pragma once

struct Rng {  // xorshift64*, then a sum of uniforms as a cheap near-normal
    unsigned long long s;
    double uniform() {
        s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
        return ((s * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
    }
    float normal() {
        double t = 0;
        for (int i = 0; i < 4; ++i) t += uniform();
        return (float)((t - 2.0) * 1.7320508);
    }
};
