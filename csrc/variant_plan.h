// The variant op's plan: everything the CPU and CUDA kernels need, computed once per call on the host.
//
//   frames uint8 (P, H, W, 3), indices (K, F), boxes (K, 4), out_hw (K, 2)
//     -> per variant: integer hull of the box, Pillow's fixed-point bicubic weights for both axes,
//        the source frame of every (t, slot), where its patches start in pixel_values
//     -> kernels: horizontal pass, vertical pass (each rounded to uint8 like Pillow), normalise by a
//        (3, 256) table, write Qwen patch order (t, h/T, w/T, merge, merge, C, tps, patch, patch)
//
// The weights are computed here, on the host, in IEEE double with no FMA contraction (CMake passes
// -ffp-contract=off), so the CPU kernel, the CUDA kernel and the Python reference share them bit for bit.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include "variant_params.h"

namespace strive {

struct VariantPlan {
  int64_t K = 0, P = 0, H = 0, W = 0;
  int64_t tps = 2, patch = 14, merge = 2, tile = 28;  // tile = patch * merge output pixels
  int64_t frame_stride = 0, row_stride = 0;           // bytes (pixel stride 3, channel stride 1)
  int64_t patch_dim = 0;                              // 3 * tps * patch * patch
  int64_t num_patches = 0;                            // rows of pixel_values
  int64_t num_bands = 0, num_tiles = 0;
  // Scratch sizes (maxima over variants): CPU bands and CUDA tiles.
  int64_t max_out_w = 0, max_span_w = 0, max_band_rows = 0;
  int64_t max_tile_span = 0;  // source columns read by one tile
  int64_t max_ksize_h = 0, max_ksize_v = 0;
  std::vector<VariantMeta> meta;
  std::vector<int32_t> frame_idx, bounds, coefs;
  std::array<float, 3 * 256> lut{};  // HF: (f32(u8 * (1/255)) - f32(mean)) / f32(std)
  std::vector<int64_t> grid_thw;     // K * 3
};

// Checks dtype / rank / size of frames, then returns them as the kernels read them: frames with channel
// stride 1 and pixel stride 3 are used in place (any frame and row strides), anything else is copied.
at::Tensor frames_for_kernel(const at::Tensor& frames);

// Validates every input (typed errors naming the argument and value) and builds the plan for `frames` as
// returned by frames_for_kernel. `indices` and `boxes` may live on any device; they are read on the host.
VariantPlan build_variant_plan(const at::Tensor& frames, const at::Tensor& indices, const at::Tensor& boxes,
                               c10::IntArrayRef out_hw, c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                               int64_t temporal_patch, int64_t patch, int64_t merge, c10::ScalarType out_dtype);

// Packs meta | frame_idx | bounds | coefs | lut into one int32 host tensor (one upload for CUDA).
struct PackedOffsets {
  int64_t meta, frame_idx, bounds, coefs, lut, total;
};
PackedOffsets packed_offsets(const VariantPlan& plan);
void pack_plan(const VariantPlan& plan, int32_t* dst);

// CPU kernel (variant_cpu.cpp). Output (num_patches, patch_dim) contiguous, float32 / bfloat16 / float16.
void variant_patchify_cpu(const VariantPlan& plan, const at::Tensor& frames, at::Tensor& out);
// Instruction set of the CPU kernel's hot loops: "avx512f", "avx2" or "generic" (cap: env STRIVE_CPU_ISA).
const char* cpu_isa();

}  // namespace strive
