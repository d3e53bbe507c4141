// The index arithmetic of src/cuda/kernels/flash_attn.cu on the CPU: its tensor-core parts are inline
// PTX and need a GPU, but which shared-memory chunk each lane copies and hands to ldmatrix is
// plain integer math. Checks, for every head dim and tiling the kernel is built for, that
//  * TileWalk (each thread copies one chunk column, destinations by a compile-time stride)
//    covers exactly the chunks of the plain walk i = tid + k * NT, each at sidx(row, col), and
//  * LdsmLane::at (per-lane register + constant) equals the swizzled sidx byte offset for
//    every lane pattern of the kernel (Q and V: rows lane&7 + 8*bit3, chunk lane>>4; K: rows
//    lane&7 + 8*(lane>>4), chunk bit3).
// Exit code 1 on the first mismatch.
#include <cstdio>
#include <set>
#include <tuple>

#include "cuda_cpu.hpp"
#undef __shared__
#define __shared__
#define FA_ONLY_D 0  // no kernel instances: their inline PTX is for the GPU
#include "../../src/cuda/kernels/flash_attn.cu"

static int failures = 0;

template <int D, int ROWS, int NT>
void check_tile_walk() {
    constexpr int NCH = D / 8;
    std::set<std::tuple<int, int, int>> plain, walked;
    for (int tid = 0; tid < NT; ++tid) {
        for (int i = tid; i < ROWS * NCH; i += NT) plain.insert({sidx<D>(i / NCH, i % NCH), i / NCH, i % NCH});
        const TileWalk<D, ROWS, NT> w(tid);
        for (int k = 0; k < w.ITER; ++k) {
            const int row = w.r0 + k * w.RSTEP;
            if (w.dst(k) != sidx<D>(row, w.c)) {
                std::printf("FAIL TileWalk<%d,%d,%d> tid %d k %d: dst %d != sidx %d\n", D, ROWS, NT, tid, k,
                            w.dst(k), sidx<D>(row, w.c));
                ++failures;
                return;
            }
            walked.insert({w.dst(k), row, w.c});
        }
    }
    if (plain != walked) {
        std::printf("FAIL TileWalk<%d,%d,%d>: %zu chunks walked, %zu expected\n", D, ROWS, NT, walked.size(),
                    plain.size());
        ++failures;
    }
}

template <int D>
void check_ldsm(int rows) {
    for (int lane = 0; lane < 32; ++lane) {
        const int pattern[2][2] = {{(lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4},   // Q, V
                                   {(lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1}};  // K
        for (auto& p : pattern) {
            const LdsmLane<D> l(p[0], p[1]);
            for (int r = 0; r + 16 <= rows; r += 16)
                for (int c = 0; c + 2 <= D / 8; c += 2) {
                    const unsigned want = 2u * sidx<D>(r + p[0], c + p[1]);
                    if (l.at(r, c) != want) {
                        std::printf("FAIL LdsmLane<%d> lane %d rows %d chunk %d: %u != %u\n", D, lane, r, c,
                                    l.at(r, c), want);
                        ++failures;
                        return;
                    }
                }
        }
    }
}

int main() {
    // (D, block rows BM = 16*MT*NW, key tile BN, threads 32*NW) of FA_KERNELS and the bench variants.
    check_tile_walk<16, 64, 128>(), check_tile_walk<16, 64, 128>();
    check_tile_walk<32, 64, 128>();
    check_tile_walk<64, 64, 128>();
    check_tile_walk<128, 128, 128>(), check_tile_walk<128, 64, 128>(), check_tile_walk<128, 32, 128>();
    check_tile_walk<128, 128, 256>(), check_tile_walk<128, 64, 256>(), check_tile_walk<128, 32, 256>();
    check_tile_walk<256, 64, 128>(), check_tile_walk<256, 32, 128>();
    check_ldsm<16>(64), check_ldsm<32>(64), check_ldsm<64>(64), check_ldsm<128>(128), check_ldsm<256>(64);
    std::printf("%s flash_attn.cu index arithmetic (TileWalk, LdsmLane) for D = 16..256\n",
                failures ? "FAIL" : "ok  ");
    return failures ? 1 : 0;
}
