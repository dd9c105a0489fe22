// SIMD primitives of the CPU kernel; see variant_cpu_simd.h. Every path computes exactly the same integers
// (the sums are exact in int32), so the choice of path never changes a result bit.
#include "variant_cpu_simd.h"

#include <atomic>
#include <cstdlib>
#include <string>

#include "variant_params.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// x86-64 with GCC/clang: AVX2 and AVX-512F versions (target attributes), picked once at run time, so the
// library stays portable while using the machine's vector width.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STRIVE_X86 1
#include <immintrin.h>
#if !defined(__clang__)  // GCC 12 flags the intrinsics' own _mm512_undefined_epi32() as maybe-uninitialised
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define STRIVE_X86 0
#endif

namespace strive {
namespace {

inline uint8_t clip8(int32_t acc) {
  acc >>= kPrecisionBits;  // arithmetic shift = floor, as Pillow's clip8 lookup
  return static_cast<uint8_t>(acc < 0 ? 0 : (acc > 255 ? 255 : acc));
}

// dst[i][q] = src[q][i] for a 16 x 16 byte block (rows given by pointers).
inline void transpose16(const uint8_t* const src[16], uint8_t* const dst[16]) {
#if defined(__SSE2__)
  __m128i r[16], t[16], u[16];
  for (int q = 0; q < 16; ++q) r[q] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[q]));
  for (int p = 0; p < 8; ++p) {  // 16-bit unit i of t[2p + i/8] = rows (2p, 2p+1) at column i
    t[2 * p] = _mm_unpacklo_epi8(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm_unpackhi_epi8(r[2 * p], r[2 * p + 1]);
  }
  for (int s = 0; s < 4; ++s) {  // 32-bit unit j of u[4s + g] = rows 4s..4s+3 at column 4g + j
    for (int h = 0; h < 2; ++h) {
      u[4 * s + 2 * h] = _mm_unpacklo_epi16(t[4 * s + h], t[4 * s + 2 + h]);
      u[4 * s + 2 * h + 1] = _mm_unpackhi_epi16(t[4 * s + h], t[4 * s + 2 + h]);
    }
  }
  for (int e = 0; e < 2; ++e) {  // 64-bit unit j of r[8e + c] = rows 8e..8e+7 at column 2c + j
    for (int g = 0; g < 4; ++g) {
      r[8 * e + 2 * g] = _mm_unpacklo_epi32(u[8 * e + g], u[8 * e + 4 + g]);
      r[8 * e + 2 * g + 1] = _mm_unpackhi_epi32(u[8 * e + g], u[8 * e + 4 + g]);
    }
  }
  for (int c = 0; c < 8; ++c) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst[2 * c]), _mm_unpacklo_epi64(r[c], r[8 + c]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst[2 * c + 1]), _mm_unpackhi_epi64(r[c], r[8 + c]));
  }
#else
  for (int q = 0; q < 16; ++q)
    for (int i = 0; i < 16; ++i) dst[i][q] = src[q][i];
#endif
}

// X[i * 16 + l] = rows[l][i] for i < n: 16 source rows -> n transposed 16-byte columns.
void transpose_in_generic(const uint8_t* const rows[kLanes], int64_t n, uint8_t* X) {
  const uint8_t* src[16];
  uint8_t* dst[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int q = 0; q < 16; ++q) src[q] = rows[q] + i, dst[q] = X + (i + q) * kLanes;
    transpose16(src, dst);
  }
  for (; i < n; ++i)
    for (int l = 0; l < kLanes; ++l) X[i * kLanes + l] = rows[l][i];
}

// out[l][i] = Y[i * 16 + l] for l < nrows (rows `stride` bytes apart), i < n.
void transpose_out_generic(const uint8_t* Y, int64_t n, uint8_t* out, int64_t stride, int nrows) {
  alignas(16) uint8_t sink[16 * 16];
  const uint8_t* src[16];
  uint8_t* dst[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int q = 0; q < 16; ++q) {
      src[q] = Y + (i + q) * kLanes;
      dst[q] = q < nrows ? out + q * stride + i : sink + q * 16;
    }
    transpose16(src, dst);
  }
  for (; i < n; ++i)
    for (int l = 0; l < nrows; ++l) out[l * stride + i] = Y[i * kLanes + l];
}

// ---- the two hot loops: generic versions (any ISA) and AVX2 / AVX-512F versions picked once at run time.
// Per tap and 16 lanes: widen uint8 -> int32, multiply by the broadcast weight, add (exact int32 sums).

// Horizontal pass of one 16-row block: Y[(xo * 3 + c) * 16 + l] for every output column xo.
void hpass_generic(const uint8_t* X, const int32_t* bounds, int32_t first_col, const int32_t* coefs, int32_t ksize,
                   int64_t out_w, uint8_t* Y) {
  for (int64_t xo = 0; xo < out_w; ++xo) {
    const uint8_t* x = X + static_cast<int64_t>(bounds[2 * xo] - first_col) * kBlock;
    const int32_t n = bounds[2 * xo + 1];
    const int32_t* k = coefs + xo * ksize;
    int32_t acc[kBlock];
    for (int i = 0; i < kBlock; ++i) acc[i] = kRoundHalf;
    for (int32_t j = 0; j < n; ++j) {
      for (int i = 0; i < kBlock; ++i) acc[i] += static_cast<int32_t>(x[j * kBlock + i]) * k[j];
    }
    for (int i = 0; i < kBlock; ++i) Y[xo * kBlock + i] = clip8(acc[i]);
  }
}

// Vertical pass of one output row: out[i] = clip8(sum_j w_j * rows[j * stride + i]), i < width.
void vpass_generic(const uint8_t* rows, int64_t stride, const int32_t* k, int32_t n, int64_t width, uint8_t* out) {
  for (int64_t i = 0; i < width; ++i) {
    int32_t acc = kRoundHalf;
    for (int32_t j = 0; j < n; ++j) acc += static_cast<int32_t>(rows[j * stride + i]) * k[j];
    out[i] = clip8(acc);
  }
}

#if STRIVE_X86
#define STRIVE_AVX2 __attribute__((target("avx2")))
#define STRIVE_AVX512 __attribute__((target("avx512f")))

STRIVE_AVX2 inline __m256i widen8_avx2(const uint8_t* p) {  // 8 bytes -> 8 int32
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
STRIVE_AVX2 inline void store16_avx2(__m256i lo, __m256i hi, uint8_t* p) {  // clip8 of 16 sums -> 16 bytes
  const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
  lo = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(lo, kPrecisionBits), zero), top);
  hi = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(hi, kPrecisionBits), zero), top);
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);  // lo0..7 | hi0..7 (int16)
  const __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);  // bytes lo | hi
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(b));
}

STRIVE_AVX2 inline void transpose_net_avx2(__m256i r[16]) {
  // The 16x16 byte transpose network of transpose16, on both 128-bit lanes at once (two blocks).
  __m256i t[16], u[16];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm256_unpacklo_epi8(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm256_unpackhi_epi8(r[2 * p], r[2 * p + 1]);
  }
  for (int s = 0; s < 4; ++s) {
    for (int h = 0; h < 2; ++h) {
      u[4 * s + 2 * h] = _mm256_unpacklo_epi16(t[4 * s + h], t[4 * s + 2 + h]);
      u[4 * s + 2 * h + 1] = _mm256_unpackhi_epi16(t[4 * s + h], t[4 * s + 2 + h]);
    }
  }
  for (int e = 0; e < 2; ++e) {
    for (int g = 0; g < 4; ++g) {
      t[8 * e + 2 * g] = _mm256_unpacklo_epi32(u[8 * e + g], u[8 * e + 4 + g]);
      t[8 * e + 2 * g + 1] = _mm256_unpackhi_epi32(u[8 * e + g], u[8 * e + 4 + g]);
    }
  }
  for (int c = 0; c < 8; ++c) {  // r[m] = column m of each lane's block
    r[2 * c] = _mm256_unpacklo_epi64(t[c], t[8 + c]);
    r[2 * c + 1] = _mm256_unpackhi_epi64(t[c], t[8 + c]);
  }
}

STRIVE_AVX2 void transpose_in_avx2(const uint8_t* const rows[kLanes], int64_t n, uint8_t* X) {
  int64_t i = 0;
  __m256i r[16];
  for (; i + 32 <= n; i += 32) {  // columns i..i+15 in lane 0, i+16..i+31 in lane 1
    for (int q = 0; q < 16; ++q) r[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[q] + i));
    transpose_net_avx2(r);
    for (int m = 0; m < 16; ++m) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(X + (i + m) * kLanes), _mm256_castsi256_si128(r[m]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(X + (i + 16 + m) * kLanes), _mm256_extracti128_si256(r[m], 1));
    }
  }
  if (i < n) {
    const uint8_t* rest[kLanes];
    for (int q = 0; q < kLanes; ++q) rest[q] = rows[q] + i;
    transpose_in_generic(rest, n - i, X + i * kLanes);
  }
}

STRIVE_AVX2 void transpose_out_avx2(const uint8_t* Y, int64_t n, uint8_t* out, int64_t stride, int nrows) {
  int64_t i = 0;
  __m256i r[16];
  for (; i + 32 <= n; i += 32) {  // lane 0: Y rows i..i+15, lane 1: Y rows i+16..i+31
    for (int q = 0; q < 16; ++q) {
      r[q] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(Y + (i + 16 + q) * kLanes),
                                 reinterpret_cast<const __m128i*>(Y + (i + q) * kLanes));
    }
    transpose_net_avx2(r);
    for (int m = 0; m < nrows; ++m) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * stride + i), r[m]);
  }
  if (i < n) transpose_out_generic(Y + i * kLanes, n - i, out + i, stride, nrows);
}

STRIVE_AVX2 void hpass_avx2(const uint8_t* X, const int32_t* bounds, int32_t first_col, const int32_t* coefs,
                            int32_t ksize, int64_t out_w, uint8_t* Y) {
  const __m256i half = _mm256_set1_epi32(kRoundHalf);
  for (int64_t xo = 0; xo < out_w; ++xo) {
    const uint8_t* x = X + static_cast<int64_t>(bounds[2 * xo] - first_col) * kBlock;
    const int32_t n = bounds[2 * xo + 1];
    const int32_t* k = coefs + xo * ksize;
    __m256i a[6] = {half, half, half, half, half, half};
    for (int32_t j = 0; j < n; ++j) {
      const __m256i kj = _mm256_set1_epi32(k[j]);
      const uint8_t* xj = x + j * kBlock;
      for (int q = 0; q < 6; ++q) a[q] = _mm256_add_epi32(a[q], _mm256_mullo_epi32(widen8_avx2(xj + 8 * q), kj));
    }
    for (int q = 0; q < 3; ++q) store16_avx2(a[2 * q], a[2 * q + 1], Y + xo * kBlock + 16 * q);
  }
}

STRIVE_AVX2 void vpass_avx2(const uint8_t* rows, int64_t stride, const int32_t* k, int32_t n, int64_t width,
                            uint8_t* out) {
  const __m256i half = _mm256_set1_epi32(kRoundHalf);
  int64_t i = 0;
  for (; i + 32 <= width; i += 32) {
    __m256i a[4] = {half, half, half, half};
    for (int32_t j = 0; j < n; ++j) {
      const __m256i kj = _mm256_set1_epi32(k[j]);
      const uint8_t* r = rows + j * stride + i;
      for (int q = 0; q < 4; ++q) a[q] = _mm256_add_epi32(a[q], _mm256_mullo_epi32(widen8_avx2(r + 8 * q), kj));
    }
    store16_avx2(a[0], a[1], out + i);
    store16_avx2(a[2], a[3], out + i + 16);
  }
  vpass_generic(rows + i, stride, k, n, width - i, out + i);
}

STRIVE_AVX512 inline __m512i widen16_avx512(const uint8_t* p) {  // 16 bytes -> 16 int32
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
STRIVE_AVX512 inline void store16_avx512(__m512i a, uint8_t* p) {
  a = _mm512_min_epi32(_mm512_max_epi32(_mm512_srai_epi32(a, kPrecisionBits), _mm512_setzero_si512()),
                       _mm512_set1_epi32(255));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a));
}

STRIVE_AVX512 void hpass_avx512(const uint8_t* X, const int32_t* bounds, int32_t first_col, const int32_t* coefs,
                                int32_t ksize, int64_t out_w, uint8_t* Y) {
  const __m512i half = _mm512_set1_epi32(kRoundHalf);
  for (int64_t xo = 0; xo < out_w; ++xo) {
    const uint8_t* x = X + static_cast<int64_t>(bounds[2 * xo] - first_col) * kBlock;
    const int32_t n = bounds[2 * xo + 1];
    const int32_t* k = coefs + xo * ksize;
    __m512i a0 = half, a1 = half, a2 = half;  // channels R, G, B of the 16 rows
    for (int32_t j = 0; j < n; ++j) {
      const __m512i kj = _mm512_set1_epi32(k[j]);
      const uint8_t* xj = x + j * kBlock;
      a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(widen16_avx512(xj), kj));
      a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(widen16_avx512(xj + 16), kj));
      a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(widen16_avx512(xj + 32), kj));
    }
    store16_avx512(a0, Y + xo * kBlock);
    store16_avx512(a1, Y + xo * kBlock + 16);
    store16_avx512(a2, Y + xo * kBlock + 32);
  }
}

STRIVE_AVX512 void vpass_avx512(const uint8_t* rows, int64_t stride, const int32_t* k, int32_t n, int64_t width,
                                uint8_t* out) {
  const __m512i half = _mm512_set1_epi32(kRoundHalf);
  int64_t i = 0;
  for (; i + 64 <= width; i += 64) {
    __m512i a[4] = {half, half, half, half};
    for (int32_t j = 0; j < n; ++j) {
      const __m512i kj = _mm512_set1_epi32(k[j]);
      const uint8_t* r = rows + j * stride + i;
      for (int q = 0; q < 4; ++q) a[q] = _mm512_add_epi32(a[q], _mm512_mullo_epi32(widen16_avx512(r + 16 * q), kj));
    }
    for (int q = 0; q < 4; ++q) store16_avx512(a[q], out + i + 16 * q);
  }
  for (; i + 16 <= width; i += 16) {
    __m512i a = half;
    for (int32_t j = 0; j < n; ++j) {
      a = _mm512_add_epi32(a, _mm512_mullo_epi32(widen16_avx512(rows + j * stride + i), _mm512_set1_epi32(k[j])));
    }
    store16_avx512(a, out + i);
  }
  vpass_generic(rows + i, stride, k, n, width - i, out + i);
}
#endif  // STRIVE_X86

CpuPasses pick(const std::string& want) {
#if STRIVE_X86
  __builtin_cpu_init();
  if (want != "avx2" && want != "generic" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2")) {
    return {transpose_in_avx2, transpose_out_avx2, hpass_avx512, vpass_avx512, "avx512f"};
  }
  if (want != "generic" && __builtin_cpu_supports("avx2")) {
    return {transpose_in_avx2, transpose_out_avx2, hpass_avx2, vpass_avx2, "avx2"};
  }
#endif
  return {transpose_in_generic, transpose_out_generic, hpass_generic, vpass_generic, "generic"};
}

// The three tables, built once; `current` points at one of them (atomic: a test may switch while idle).
struct Tables {
  CpuPasses best = pick(""), avx2 = pick("avx2"), generic = pick("generic");
  std::atomic<const CpuPasses*> current{nullptr};
  Tables() {
    const char* cap = std::getenv("STRIVE_CPU_ISA");
    current = select(cap ? cap : "");
  }
  const CpuPasses* select(const std::string& want) const {
    return want == "generic" ? &generic : (want == "avx2" ? &avx2 : &best);
  }
};

Tables& tables() {
  static Tables t;
  return t;
}

}  // namespace

const CpuPasses& cpu_passes() { return *tables().current.load(std::memory_order_acquire); }

const char* set_cpu_isa_cap(const std::string& cap) {
  Tables& t = tables();
  t.current.store(t.select(cap), std::memory_order_release);
  return cpu_passes().isa;
}

}  // namespace strive
