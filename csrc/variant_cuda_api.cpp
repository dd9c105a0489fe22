// CUDA binding of the variant op (built only with STRIVE_WITH_CUDA; CI compiles it in the CUDA compile
// check): checks, plan upload on the current stream, launch of the kernel in variant_cuda.cu.
#include <algorithm>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "variant_plan.h"

namespace strive {
namespace {

std::tuple<at::Tensor, at::Tensor> variant_patchify_cuda_op(const at::Tensor& frames, const at::Tensor& indices,
                                                            const at::Tensor& boxes, c10::IntArrayRef out_hw,
                                                            c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                                                            int64_t temporal_patch, int64_t patch, int64_t merge,
                                                            c10::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(frames.is_cuda(), "variant_patchify (CUDA kernel): frames must be on a CUDA device, got ",
                    frames.device());
  const c10::cuda::CUDAGuard guard(frames.device());
  // indices and boxes are read on the host (a sync if they live on the GPU; they are tiny)
  const at::Tensor src = frames_for_kernel(frames);
  const VariantPlan plan =
      build_variant_plan(src, indices, boxes, out_hw, mean, std, temporal_patch, patch, merge, out_dtype);
  const int64_t T = plan.tile;
  TORCH_CHECK_VALUE(T * T <= kCudaMaxPixPerThread * 1024, "variant_patchify (CUDA kernel): patch*merge = ", T,
                    " is larger than the kernel's tile limit of 64");
  at::Tensor out = at::empty({plan.num_patches, plan.patch_dim}, frames.options().dtype(out_dtype));
  const auto pinned = at::TensorOptions().pinned_memory(true);
  at::Tensor grid_host = at::empty({plan.K, 3}, pinned.dtype(at::kLong));
  std::copy(plan.grid_thw.begin(), plan.grid_thw.end(), grid_host.mutable_data_ptr<int64_t>());
  at::Tensor grid = grid_host.to(frames.device(), at::kLong, /*non_blocking=*/true);
  if (plan.num_tiles == 0) return {out, grid};

  // One upload of the whole plan; the caching host allocator keeps the pinned buffer until the copy ran.
  const PackedOffsets o = packed_offsets(plan);
  at::Tensor plan_host = at::empty({o.total}, pinned.dtype(at::kInt));
  pack_plan(plan, plan_host.mutable_data_ptr<int32_t>());
  const at::Tensor plan_dev = plan_host.to(frames.device(), at::kInt, /*non_blocking=*/true);

  CudaParams p{};
  p.frames = src.const_data_ptr<uint8_t>();
  p.frames_end = p.frames + (plan.P - 1) * src.stride(0) + (plan.H - 1) * src.stride(1) + plan.W * 3;
  p.frame_stride = src.stride(0), p.row_stride = src.stride(1);
  p.plan = plan_dev.const_data_ptr<int32_t>();
  p.off_frame_idx = static_cast<int32_t>(o.frame_idx), p.off_bounds = static_cast<int32_t>(o.bounds);
  p.off_coefs = static_cast<int32_t>(o.coefs), p.off_lut = static_cast<int32_t>(o.lut);
  p.K = static_cast<int32_t>(plan.K), p.tps = static_cast<int32_t>(plan.tps);
  p.patch = static_cast<int32_t>(plan.patch), p.merge = static_cast<int32_t>(plan.merge);
  p.tile = static_cast<int32_t>(T);
  p.patch_dim = plan.patch_dim;
  p.num_tiles = plan.num_tiles;
  p.out = out.data_ptr();
  p.out_dtype = out_dtype == at::kFloat ? OutDtype::kFloat32
                                        : (out_dtype == at::kBFloat16 ? OutDtype::kBFloat16 : OutDtype::kFloat16);
  // Staged row: the widest tile span plus up to 15 bytes of alignment slack, rounded up to 16 bytes.
  const int64_t stride = (plan.max_tile_span * 3 + 15 + 15) / 16 * 16;
  TORCH_CHECK_VALUE(stride < (1 << 30), "variant_patchify (CUDA kernel): a tile spans ", plan.max_tile_span,
                    " source columns");
  p.stage_stride = static_cast<int32_t>(stride);
  p.rows_per_stage = static_cast<int32_t>(
      std::clamp<int64_t>(static_cast<int64_t>(kCudaStageBudget) / stride, 1, kCudaMaxStageRows));
  p.max_ksize_h = static_cast<int32_t>(plan.max_ksize_h), p.max_ksize_v = static_cast<int32_t>(plan.max_ksize_v);
  const size_t smem = cuda_smem_bytes(p);
  int device_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, frames.get_device()));
  TORCH_CHECK_VALUE(smem <= static_cast<size_t>(device_limit), "variant_patchify (CUDA kernel): a tile reads ",
                    plan.max_tile_span, " source columns with up to ", std::max(p.max_ksize_h, p.max_ksize_v),
                    " taps, needing ", smem, " bytes of shared memory (device limit ", device_limit,
                    "); use a smaller downscale factor per variant");
  const int threads = T * T <= kCudaMaxPixPerThread * 256 ? 256 : 1024;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(frames.get_device()).stream();
  C10_CUDA_CHECK(static_cast<cudaError_t>(launch_variant_patchify_cuda(p, threads, smem, stream)));
  return {out, grid};
}

}  // namespace
}  // namespace strive

TORCH_LIBRARY_IMPL(strive, CUDA, m) { m.impl("variant_patchify", &strive::variant_patchify_cuda_op); }
