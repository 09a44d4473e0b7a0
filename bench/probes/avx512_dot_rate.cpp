// The ceiling of this CPU's AVX-512 dot-product instructions (bench/PROFILE.md, "On a CPU without AMX"):
// the most a bf16 or an int8 matmul could reach here, per thread and over every thread at once.
//
//   g++ -O2 -mavx512f -mavx512bf16 -mavx512vnni -pthread -o /tmp/avx512_dot_rate bench/probes/avx512_dot_rate.cpp
//   /tmp/avx512_dot_rate
//
// Each step is 12 independent instructions on registers (no loads, more chains than latency x rate),
// written in assembly so the compiler can neither fold nor spill them:
//   VDPBF16PS zmm   32 bf16 pairs multiplied and added into 16 floats: 64 flops
//   VPDPBUSD zmm    64 u8 x s8 products added into 16 int32: 128 ops
// A matmul also loads its operands and sums its tiles, so it runs below these.

#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr long STEPS = 100000000;

#define TWELVE(op)                                                                                   \
    op " %12, %12, %0\n\t" op " %12, %12, %1\n\t" op " %12, %12, %2\n\t" op " %12, %12, %3\n\t" op   \
       " %12, %12, %4\n\t" op " %12, %12, %5\n\t" op " %12, %12, %6\n\t" op " %12, %12, %7\n\t" op   \
       " %12, %12, %8\n\t" op " %12, %12, %9\n\t" op " %12, %12, %10\n\t" op " %12, %12, %11\n\t"

// Billions of instructions per second on this thread.
template <bool Int8> double instructions_per_ns() {
    // Twelve named accumulators, not an array: an array would be stored and reloaded every step.
    __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2),
            a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
            a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7), a8 = _mm512_set1_epi32(8),
            a9 = _mm512_set1_epi32(9), a10 = _mm512_set1_epi32(10), a11 = _mm512_set1_epi32(11);
    const __m512i x = _mm512_set1_epi32(0x01010101);
    const auto t0 = std::chrono::steady_clock::now();
    for (long s = 0; s < STEPS; s++) {
        if constexpr (Int8) {
            __asm__ volatile(TWELVE("vpdpbusd")
                             : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7),
                               "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11)
                             : "v"(x));
        } else {
            __asm__ volatile(TWELVE("vdpbf16ps")
                             : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7),
                               "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11)
                             : "v"(x));
        }
    }
    return STEPS * 12.0 / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}

template <bool Int8> void report(const char * name, double ops_per_instruction) {
    const double one = instructions_per_ns<Int8>();
    const unsigned threads = std::thread::hardware_concurrency();
    std::vector<double> rates(threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; t++) pool.emplace_back([&rates, t] { rates[t] = instructions_per_ns<Int8>(); });
    double all = 0;
    for (unsigned t = 0; t < threads; t++) {
        pool[t].join();
        all += rates[t];
    }
    std::printf("%-14s %5.2f G instr/s, %6.1f G ops/s on 1 thread; %6.1f G ops/s on %u\n", name, one,
                one * ops_per_instruction, all * ops_per_instruction, threads);
}

}  // namespace

int main() {
    report<false>("VDPBF16PS zmm", 64);
    report<true>("VPDPBUSD zmm", 128);
}
