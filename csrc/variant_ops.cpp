// Registration of the strive:: ops (schema + CPU kernel). The CUDA kernel registers itself in
// variant_cuda_api.cpp; the fake (meta) kernel for torch.compile lives in Python (kernels/variant.py).
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "output_cache.h"
#include "variant_cpu_simd.h"
#include "variant_plan.h"

namespace strive {
namespace {

std::tuple<at::Tensor, at::Tensor> variant_patchify_cpu_op(const at::Tensor& frames, const at::Tensor& indices,
                                                           const at::Tensor& boxes, c10::IntArrayRef out_hw,
                                                           c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                                                           int64_t temporal_patch, int64_t patch, int64_t merge,
                                                           c10::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(frames.device().is_cpu(), "variant_patchify (CPU kernel): frames must be on the CPU, got ",
                    frames.device());
  const at::Tensor src = frames_for_kernel(frames);
  const VariantPlan plan =
      build_variant_plan(src, indices, boxes, out_hw, mean, std, temporal_patch, patch, merge, out_dtype);
  at::Tensor out = empty_cpu_output({plan.num_patches, plan.patch_dim}, out_dtype);
  variant_patchify_cpu(plan, src, out);
  at::Tensor grid = at::tensor(plan.grid_thw, at::TensorOptions().dtype(at::kLong)).view({plan.K, 3});
  return {out, grid};
}

// Diagnostic for tests: [torch intra-op threads, distinct threads that ran an at::parallel_for of n items
// from this library, 1 if this library was compiled with OpenMP (else at::parallel_for runs serially here)].
std::vector<int64_t> cpu_parallel_info(const at::Tensor& /*device anchor*/, int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
#if defined(_OPENMP)
  const int64_t openmp = 1;
#else
  const int64_t openmp = 0;
#endif
  return {at::get_num_threads(), static_cast<int64_t>(ids.size()), openmp};
}

// Diagnostic: bytes of freed outputs the CPU output cache holds for reuse (output_cache.h).
int64_t cpu_output_cache_bytes(const at::Tensor& /*device anchor*/) { return output_cache_bytes(); }

// Diagnostic: the CPU kernel's instruction set; a non-empty `cap` ("best", "avx2", "generic") re-caps it first.
std::string cpu_isa_op(const at::Tensor& /*device anchor*/, c10::string_view cap) {
  if (!cap.empty()) return set_cpu_isa_cap(cap == "best" ? std::string() : std::string(cap));
  return cpu_isa();
}

}  // namespace
}  // namespace strive

TORCH_LIBRARY(strive, m) {
  m.def(
      "variant_patchify(Tensor frames, Tensor indices, Tensor boxes, int[] out_hw, float[] mean, float[] std, "
      "int temporal_patch, int patch, int merge, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("_cpu_parallel_info(Tensor anchor, int n) -> int[]");
  m.def("_cpu_isa(Tensor anchor, str cap=\"\") -> str");
  m.def("_cpu_output_cache_bytes(Tensor anchor) -> int");
}

TORCH_LIBRARY_IMPL(strive, CPU, m) {
  m.impl("variant_patchify", &strive::variant_patchify_cpu_op);
  m.impl("_cpu_parallel_info", &strive::cpu_parallel_info);
  m.impl("_cpu_isa", &strive::cpu_isa_op);
  m.impl("_cpu_output_cache_bytes", &strive::cpu_output_cache_bytes);
}
