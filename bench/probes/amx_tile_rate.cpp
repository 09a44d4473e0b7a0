// How fast this CPU's AMX tiles run int8 products, with and without tile loads (bench/PROFILE.md,
// "Why the ozaki tiles wait"). One thread; every tile 16 rows x 64 bytes, as in lfm2edge's int8 kernels.
//
//   g++ -O2 -mamx-tile -mamx-int8 -o /tmp/amx_tile_rate bench/probes/amx_tile_rate.cpp && /tmp/amx_tile_rate
//
// Patterns, each over operands that fit L1 (16 KB) and then L2 (512 KB):
//   products only      4 independent TDPBSSD per step, no loads (the tiles' own rate)
//   loads only         4 TILELOADD per step
//   32 x 32 block      4 loads (2 A, 2 B tiles) then 4 products into 4 accumulators: the kernels' inner step
//   double-buffered    2 accumulators, operands alternating between two sets of 3 tiles, so a load never
//                      waits for a product that reads the same tile
// Prints nanoseconds per product (per load for "loads only"): if loads and products overlapped, the block
// would take about the larger of the two alone.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr long STEPS = 1000000;
constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

enum class Pattern { products_only, loads_only, block_32x32, double_buffered };

double ns_per_op(Pattern pattern, const int8_t * data, size_t span) {
    const size_t mask = span - 1;  // span is a power of two
    size_t off = 0;
    long ops = 0;
    auto at = [&](size_t delta) { return data + ((off + delta) & mask); };
    const auto t0 = std::chrono::steady_clock::now();
    for (long step = 0; step < STEPS; ++step) {
        switch (pattern) {
            case Pattern::products_only:
                _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
                ops += 4;
                break;
            case Pattern::loads_only:
                _tile_loadd(4, at(0), 64); _tile_loadd(5, at(1024), 64);
                _tile_loadd(6, at(2048), 64); _tile_loadd(7, at(3072), 64);
                ops += 4, off += 4096;
                break;
            case Pattern::block_32x32:
                _tile_loadd(4, at(0), 64); _tile_loadd(5, at(1024), 64);
                _tile_loadd(6, at(2048), 64); _tile_loadd(7, at(3072), 64);
                _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
                ops += 4, off += 4096;
                break;
            case Pattern::double_buffered:
                _tile_loadd(4, at(0), 64); _tile_loadd(6, at(1024), 64); _tile_loadd(7, at(2048), 64);
                _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7);
                _tile_loadd(5, at(3072), 64); _tile_loadd(2, at(4096), 64); _tile_loadd(3, at(5120), 64);
                _tile_dpbssd(0, 5, 2); _tile_dpbssd(1, 5, 3);
                ops += 4, off += 6144;
                break;
        }
    }
    const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - t0;
    return took.count() / ops;
}

}  // namespace

int main() {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        std::fprintf(stderr, "the kernel refused AMX tile data to this thread (no AMX?)\n");
        return 1;
    }
    alignas(64) TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);

    const struct { const char * name; Pattern pattern; } patterns[] = {
        {"products only", Pattern::products_only},
        {"loads only", Pattern::loads_only},
        {"32 x 32 block", Pattern::block_32x32},
        {"double-buffered", Pattern::double_buffered},
    };
    for (size_t span : {size_t(16) << 10, size_t(512) << 10}) {
        std::vector<int8_t> buffer(span + 4096, 1);
        const int8_t * data = reinterpret_cast<const int8_t *>((reinterpret_cast<uintptr_t>(buffer.data()) + 4095) & ~uintptr_t(4095));
        for (const auto & p : patterns) {
            std::printf("%4zu KB  %-16s %5.1f ns per %s\n", span >> 10, p.name, ns_per_op(p.pattern, data, span),
                        p.pattern == Pattern::loads_only ? "load" : "product");
        }
    }
    _tile_release();
    return 0;
}
