// A minimal CPU stand-in for the CUDA execution model, enough to run the plain-CUDA kernels of
// src/cuda/kernels/fused.cu on a machine without a GPU (scripts/cuda/emulate-kernels.sh). Blocks run
// one after another; the threads of a block run as real OS threads, so __syncthreads and the
// warp shuffles are real barriers and a missing one shows up as a wrong result, not a hang.
// Not here: inline PTX (ptx_emu.hpp has the helpers flash_attn.cu uses), atomics.
// A missing barrier shows only when the OS happens to interleave the threads badly.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
// Static locals are shared by every thread; blocks run one at a time, so that is a block's
// shared memory.
#define __shared__ static

// CUDA's built-in integer min/max.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// A vector access of `bytes` (8 or 16): both addresses must be aligned to it, as on the GPU
// (where a misaligned one is a fatal "misaligned address" error).
inline void emu_copy_aligned(void* dst, const void* src, unsigned bytes) {
    if (((unsigned long long)dst | (unsigned long long)src) & (bytes - 1)) {
        std::fprintf(stderr, "misaligned %u-byte access (%p <- %p)\n", bytes, dst, src);
        std::abort();
    }
    std::memcpy(dst, src, bytes);
}

struct EmuWarp {
    std::barrier<> bar{32};
    float slot[32];
    int vote[32];
};
inline thread_local EmuWarp* emu_warp;
inline thread_local std::barrier<>* emu_block_barrier;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }

// Full-mask xor shuffle: every lane of the warp must call it (as the kernels do).
inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int = 32) {
    const int lane = threadIdx.x & 31;
    emu_warp->slot[lane] = v;
    emu_warp->bar.arrive_and_wait();
    const float r = emu_warp->slot[lane ^ lane_mask];
    emu_warp->bar.arrive_and_wait();
    return r;
}

// Full-mask vote: every lane of the warp must call it.
inline bool __any_sync(unsigned, int pred) {
    const int lane = threadIdx.x & 31;
    emu_warp->vote[lane] = pred != 0;
    emu_warp->bar.arrive_and_wait();
    bool any = false;
    for (int i = 0; i < 32; ++i) any = any || emu_warp->vote[i];
    emu_warp->bar.arrive_and_wait();
    return any;
}

// kernel<<<grid, block>>>(args...) as emu_launch(grid, block, [&] { kernel(args...); }).
// One-dimensional blocks only (all of fused.cu's launches), a multiple of 32 threads.
template <class F>
void emu_launch(Dim3 grid, unsigned threads, F body) {
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    std::barrier<> block_barrier(threads);
    std::vector<std::unique_ptr<EmuWarp>> warps;
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
    // One OS thread per CUDA thread for the whole launch; the blocks run one after another,
    // each ended by a barrier so the next block cannot overwrite shared memory still in use.
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            threadIdx = Dim3{t, 0, 0};
            emu_warp = warps[t / 32].get();
            emu_block_barrier = &block_barrier;
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = Dim3{x, y, z};
                        body();
                        block_barrier.arrive_and_wait();
                    }
        });
    for (auto& th : pool) th.join();
}
