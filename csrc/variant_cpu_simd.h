// SIMD primitives of the CPU kernel (variant_cpu_simd.cpp): byte transposes and the two fixed-point
// resampling passes, each in a generic, an AVX2 and an AVX-512F version, picked once at run time.
//
// Layout of a horizontal block: 16 source rows are transposed so that byte i of row l sits at
// X[i * 16 + l]; one source column (3 channels x 16 rows) is then 48 contiguous bytes, and an output
// column is sum_j w_j * column(x_j) over 48 int32 lanes with one broadcast weight per tap.
#pragma once

#include <cstdint>
#include <string>

namespace strive {

constexpr int kLanes = 16;          // source rows in one horizontal block
constexpr int kBlock = 3 * kLanes;  // bytes of one transposed source column (16 rows x RGB)

struct CpuPasses {
  // X[i * 16 + l] = rows[l][i] for i < n.
  void (*transpose_in)(const uint8_t* const rows[kLanes], int64_t n, uint8_t* X);
  // out[l * stride + i] = Y[i * 16 + l] for l < nrows, i < n.
  void (*transpose_out)(const uint8_t* Y, int64_t n, uint8_t* out, int64_t stride, int nrows);
  // Y[(xo * 3 + c) * 16 + l] = clip8(2^21 + sum_j w[xo][j] * X[(first_tap(xo) - first_col + j) * 48 + c*16 + l]).
  void (*hpass)(const uint8_t* X, const int32_t* bounds, int32_t first_col, const int32_t* coefs, int32_t ksize,
                int64_t out_w, uint8_t* Y);
  // out[i] = clip8(2^21 + sum_j k[j] * rows[j * stride + i]) for i < width.
  void (*vpass)(const uint8_t* rows, int64_t stride, const int32_t* k, int32_t n, int64_t width, uint8_t* out);
  const char* isa;  // "avx512f", "avx2" or "generic"
};

// The widest set this CPU and OS support; the environment variable STRIVE_CPU_ISA=avx2|generic caps it.
// All paths give identical results.
const CpuPasses& cpu_passes();
// Re-cap at run time ("" = best, "avx2", "generic"; for tests, while no op runs); returns the set now used.
const char* set_cpu_isa_cap(const std::string& cap);

}  // namespace strive
