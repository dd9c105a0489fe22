// Parameters of the variant op shared by host and device code. Plain C++ (no torch headers), so the CUDA
// kernel compiles with nvcc alone -- quickly, also in CI against a CPU torch (see CMakeLists.txt).
//
// Packed plan (int32 words, built on the host by variant_plan.cpp, one upload for CUDA):
//   [ VariantMeta x K | frame_idx | bounds (first tap, tap count) pairs | weights | lut (3 x 256 float) ]
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define STRIVE_HOST_DEVICE __host__ __device__
#else
#define STRIVE_HOST_DEVICE
#endif

namespace strive {

// Pillow's PRECISION_BITS: 8 bits of result and 2 bits of headroom (negative lobes) in an int32.
constexpr int kPrecisionBits = 22;
constexpr int32_t kRoundHalf = 1 << (kPrecisionBits - 1);

// One variant, all int32 so the CUDA kernel reads it straight from the packed plan.
struct VariantMeta {
  int32_t hx0, hy0;            // hull origin in the frame (pixels)
  int32_t out_h, out_w;        // output size (multiples of tile)
  int32_t grid_t;              // ceil(F / tps)
  int32_t ksize_h, ksize_v;    // weights per output column / row (padded with zeros past the tap count)
  int32_t bounds_h, bounds_v;  // word offsets of out_w resp. out_h (first tap, count) pairs, hull coords
  int32_t coef_h, coef_v;      // word offsets of out_w * ksize_h resp. out_h * ksize_v weights
  int32_t frames;              // offset into frame_idx: grid_t * tps source frames (padded)
  int32_t patch_row;           // first row of this variant in pixel_values
  int32_t first_band;          // CPU work items (t, band of tile output rows): prefix over variants
  int32_t first_tile;          // CUDA blocks (t, tile row, tile col): prefix over variants
  int32_t pad_;
};
static_assert(sizeof(VariantMeta) == 16 * sizeof(int32_t), "VariantMeta is packed as 16 int32");

enum class OutDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Everything one launch of the CUDA kernel needs (device pointers).
struct CudaParams {
  const uint8_t* frames;
  const uint8_t* frames_end;  // one past the last byte of the frames tensor (bound of 16-byte loads)
  int64_t frame_stride, row_stride;  // bytes; pixel stride 3, channel stride 1
  const int32_t* plan;
  int32_t off_frame_idx, off_bounds, off_coefs, off_lut;
  int32_t K, tps, patch, merge, tile;
  int32_t rows_per_stage, stage_stride;  // source rows staged at once, bytes per staged row (x16)
  int32_t max_ksize_h, max_ksize_v;      // widest weight rows over the variants (shared-memory tables)
  int64_t patch_dim;
  int64_t num_tiles;
  void* out;
  OutDtype out_dtype;
};

// Launch limits, shared by the host planner and the kernel.
constexpr int kCudaMaxPixPerThread = 4;
constexpr int kCudaMaxStageRows = 16;
constexpr size_t kCudaStageBudget = 40 << 10;  // bytes of staged rows before asking for opt-in shared memory

// Dynamic shared memory of one block: normalisation table, row shifts, the tile's weights (T columns x
// ksize_h, T rows x ksize_v) and column bounds, then (16-byte aligned) staged rows and horizontal results.
STRIVE_HOST_DEVICE inline size_t cuda_smem_tables_bytes(int tile, int max_ksize_h, int max_ksize_v) {
  const size_t words = 3 * 256 + kCudaMaxStageRows + static_cast<size_t>(tile) * (max_ksize_h + max_ksize_v + 2);
  return (words * sizeof(int32_t) + 15) / 16 * 16;
}
inline size_t cuda_smem_bytes(const CudaParams& p) {
  return cuda_smem_tables_bytes(p.tile, p.max_ksize_h, p.max_ksize_v) +
         static_cast<size_t>(p.rows_per_stage) * (static_cast<size_t>(p.stage_stride) + 3 * p.tile);
}

// Defined in variant_cuda.cu. Returns the CUDA error of the launch (cudaSuccess = 0) as an int so this
// header needs no CUDA include; `stream` is a cudaStream_t.
int launch_variant_patchify_cuda(const CudaParams& p, int threads, size_t smem, void* stream);

}  // namespace strive
