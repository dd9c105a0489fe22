// Host side of the variant op: input checks and the plan (Pillow's fixed-point weights, frame table,
// output offsets, normalisation table). Shared by the CPU and the CUDA kernel.
#include "variant_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace strive {
namespace {

// Pillow's bicubic_filter, a = -0.5 (Resample.c). Kept in this operation order on purpose: the weights
// must round exactly like Pillow's (and like kernels/reference/variant.py).
double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis: the span [in0, in1) (float32, like
// Pillow's box) of an axis of in_size pixels resampled to out_size pixels. Appends out_size pairs
// (first tap, tap count) to `bounds` and out_size * ksize weights (22 fractional bits) to `coefs`.
int32_t precompute_axis(int64_t in_size, float in0, float in1, int64_t out_size, std::vector<int32_t>& bounds,
                        std::vector<int32_t>& coefs) {
  const double scale = static_cast<double>(in1 - in0) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  const int32_t ksize = static_cast<int32_t>(std::ceil(support)) * 2 + 1;
  std::vector<double> k(ksize);
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      const double w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int64_t x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    for (int64_t x = 0; x < ksize; ++x) {
      if (x >= xmax) {
        coefs.push_back(0);
      } else {
        const double v = k[x] * (1 << kPrecisionBits);
        coefs.push_back(static_cast<int32_t>(k[x] < 0 ? -0.5 + v : 0.5 + v));
      }
    }
    bounds.push_back(static_cast<int32_t>(xmin));
    bounds.push_back(static_cast<int32_t>(xmax));
  }
  return ksize;
}

int32_t checked_i32(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v >= 0 && v <= std::numeric_limits<int32_t>::max(), "variant_patchify: ", what, " = ", v,
                    " does not fit the op's int32 tables (too many patches or too large sizes)");
  return static_cast<int32_t>(v);
}

}  // namespace

static void check_frames(const at::Tensor& frames) {
  TORCH_CHECK_TYPE(frames.scalar_type() == at::kByte, "variant_patchify: frames must be uint8 (decoded RGB), got ",
                   frames.scalar_type());
  TORCH_CHECK_VALUE(frames.dim() == 4 && frames.size(3) == 3,
                    "variant_patchify: frames must have shape (P, H, W, 3), got ", frames.sizes());
  TORCH_CHECK_VALUE(frames.size(0) >= 1 && frames.size(1) >= 1 && frames.size(2) >= 1,
                    "variant_patchify: frames must be non-empty, got shape ", frames.sizes());
}

at::Tensor frames_for_kernel(const at::Tensor& frames) {
  check_frames(frames);
  // Rows and frames may be strided (a view of a larger buffer); pixels must be packed RGB.
  if (frames.stride(3) == 1 && frames.stride(2) == 3 && frames.stride(1) >= 0 && frames.stride(0) >= 0) {
    return frames;
  }
  return frames.contiguous();
}

VariantPlan build_variant_plan(const at::Tensor& frames, const at::Tensor& indices_in, const at::Tensor& boxes_in,
                               c10::IntArrayRef out_hw, c10::ArrayRef<double> mean, c10::ArrayRef<double> std,
                               int64_t temporal_patch, int64_t patch, int64_t merge, c10::ScalarType out_dtype) {
  // ---- inputs (messages mirror kernels/reference/variant.py:check_variant_inputs)
  check_frames(frames);
  TORCH_CHECK_VALUE(frames.stride(3) == 1 && frames.stride(2) == 3, "variant_patchify: the plan needs packed RGB "
                    "pixels (pass frames through frames_for_kernel), got strides ", frames.strides());
  TORCH_CHECK_VALUE(temporal_patch >= 1 && patch >= 1 && merge >= 1,
                    "variant_patchify: temporal_patch, patch and merge must be >= 1, got ", temporal_patch, ", ",
                    patch, ", ", merge);
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                   "variant_patchify: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK_VALUE(mean.size() == 3, "variant_patchify: mean must have 3 values (R, G, B), got ", mean);
  TORCH_CHECK_VALUE(std.size() == 3, "variant_patchify: std must have 3 values (R, G, B), got ", std);
  for (double s : std) TORCH_CHECK_VALUE(s > 0, "variant_patchify: std must be > 0, got ", std);

  TORCH_CHECK_TYPE(c10::isIntegralType(indices_in.scalar_type(), /*includeBool=*/false),
                   "variant_patchify: indices must be an integer tensor (int64), got ", indices_in.scalar_type());
  TORCH_CHECK_VALUE(indices_in.dim() == 2 && indices_in.size(1) >= 1,
                    "variant_patchify: indices must have shape (K, F) with F >= 1, got ", indices_in.sizes());
  const int64_t K = indices_in.size(0), F = indices_in.size(1);
  const int64_t P = frames.size(0), H = frames.size(1), W = frames.size(2);
  const at::Tensor indices = indices_in.to(at::kCPU, at::kLong).contiguous();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < K * F; ++i) {
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < P, "variant_patchify: indices must be in [0, P=", P, "), got ", idx[i]);
  }

  TORCH_CHECK_TYPE(at::isFloatingType(boxes_in.scalar_type()) || c10::isIntegralType(boxes_in.scalar_type(), false),
                   "variant_patchify: boxes must be a float32 (or integer) tensor, got ", boxes_in.scalar_type());
  TORCH_CHECK_VALUE(boxes_in.dim() == 2 && boxes_in.size(0) == K && boxes_in.size(1) == 4,
                    "variant_patchify: boxes must have shape (K=", K, ", 4) as (x0, y0, x1, y1), got ",
                    boxes_in.sizes());
  const at::Tensor boxes = boxes_in.to(at::kCPU, at::kFloat).contiguous();
  const float* box = boxes.const_data_ptr<float>();
  TORCH_CHECK_VALUE(static_cast<int64_t>(out_hw.size()) == 2 * K,
                    "variant_patchify: out_hw must have one (h, w) per variant (K=", K, "), got ",
                    out_hw.size(), " values");

  VariantPlan plan;
  plan.K = K, plan.P = P, plan.H = H, plan.W = W;
  plan.tps = temporal_patch, plan.patch = patch, plan.merge = merge, plan.tile = patch * merge;
  plan.frame_stride = frames.stride(0), plan.row_stride = frames.stride(1);
  plan.patch_dim = 3 * temporal_patch * patch * patch;
  const int64_t T = plan.tile;
  const int64_t grid_t = (F + temporal_patch - 1) / temporal_patch;

  int64_t patch_row = 0, band = 0, tile = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float x0 = box[4 * k], y0 = box[4 * k + 1], x1 = box[4 * k + 2], y1 = box[4 * k + 3];
    const bool finite = std::isfinite(x0) && std::isfinite(y0) && std::isfinite(x1) && std::isfinite(y1);
    TORCH_CHECK_VALUE(finite && 0 <= x0 && x0 < x1 && x1 <= W && 0 <= y0 && y0 < y1 && y1 <= H,
                      "variant_patchify: boxes[", k, "] = (", x0, ", ", y0, ", ", x1, ", ", y1,
                      ") must satisfy 0 <= x0 < x1 <= W=", W, " and 0 <= y0 < y1 <= H=", H);
    const int64_t oh = out_hw[2 * k], ow = out_hw[2 * k + 1];
    TORCH_CHECK_VALUE(oh > 0 && ow > 0 && oh % T == 0 && ow % T == 0, "variant_patchify: out_hw[", k, "] = (", oh,
                      ", ", ow, ") must be two positive multiples of patch*merge=", T);

    VariantMeta m{};
    // Integer hull: the filter reads nothing outside it; x0 - floor(x0) etc. are exact in float32.
    const float hx0 = std::floor(x0), hy0 = std::floor(y0);
    const int64_t hull_w = static_cast<int64_t>(std::ceil(x1) - hx0);
    const int64_t hull_h = static_cast<int64_t>(std::ceil(y1) - hy0);
    m.hx0 = static_cast<int32_t>(hx0), m.hy0 = static_cast<int32_t>(hy0);
    m.out_h = checked_i32(oh, "out_h"), m.out_w = checked_i32(ow, "out_w");
    m.grid_t = checked_i32(grid_t, "grid_t");
    m.bounds_h = checked_i32(static_cast<int64_t>(plan.bounds.size()), "bounds size");
    m.coef_h = checked_i32(static_cast<int64_t>(plan.coefs.size()), "coefs size");
    m.ksize_h = precompute_axis(hull_w, x0 - hx0, x1 - hx0, ow, plan.bounds, plan.coefs);
    m.bounds_v = checked_i32(static_cast<int64_t>(plan.bounds.size()), "bounds size");
    m.coef_v = checked_i32(static_cast<int64_t>(plan.coefs.size()), "coefs size");
    m.ksize_v = precompute_axis(hull_h, y0 - hy0, y1 - hy0, oh, plan.bounds, plan.coefs);
    checked_i32(static_cast<int64_t>(plan.coefs.size()), "coefs size");

    // Source frames per (t, slot); F not a multiple of tps repeats the last frame (HF's video processor).
    m.frames = checked_i32(static_cast<int64_t>(plan.frame_idx.size()), "frame table size");
    for (int64_t i = 0; i < grid_t * temporal_patch; ++i) {
      plan.frame_idx.push_back(static_cast<int32_t>(idx[k * F + std::min(i, F - 1)]));
    }
    m.patch_row = checked_i32(patch_row, "pixel_values rows");
    m.first_band = checked_i32(band, "band count");
    m.first_tile = checked_i32(tile, "tile count");
    patch_row += grid_t * (oh / patch) * (ow / patch);
    band += grid_t * (oh / T);
    tile += grid_t * (oh / T) * (ow / T);

    // Scratch sizes: source rows per band of T output rows, source columns per tile / per row.
    const int32_t* bh = plan.bounds.data() + m.bounds_h;
    const int32_t* bv = plan.bounds.data() + m.bounds_v;
    for (int64_t y = 0; y < oh; y += T) {
      const int64_t rows = bv[2 * (y + T - 1)] + bv[2 * (y + T - 1) + 1] - bv[2 * y];
      plan.max_band_rows = std::max(plan.max_band_rows, rows);
    }
    for (int64_t x = 0; x < ow; x += T) {
      const int64_t span = bh[2 * (x + T - 1)] + bh[2 * (x + T - 1) + 1] - bh[2 * x];
      plan.max_tile_span = std::max(plan.max_tile_span, span);
    }
    plan.max_span_w = std::max<int64_t>(plan.max_span_w, bh[2 * (ow - 1)] + bh[2 * (ow - 1) + 1] - bh[0]);
    plan.max_out_w = std::max(plan.max_out_w, ow);
    plan.max_ksize_h = std::max<int64_t>(plan.max_ksize_h, m.ksize_h);
    plan.max_ksize_v = std::max<int64_t>(plan.max_ksize_v, m.ksize_v);
    plan.meta.push_back(m);
    plan.grid_thw.insert(plan.grid_thw.end(), {grid_t, oh / patch, ow / patch});
  }
  plan.num_patches = checked_i32(patch_row, "pixel_values rows");
  plan.num_bands = checked_i32(band, "band count");
  plan.num_tiles = checked_i32(tile, "tile count");

  // HF's rescale + normalize in float32: x = f32(u8 * (1/255 in double)); y = (x - f32(mean)) / f32(std).
  for (int c = 0; c < 3; ++c) {
    const float mc = static_cast<float>(mean[c]), sc = static_cast<float>(std[c]);
    for (int v = 0; v < 256; ++v) {
      const float x = static_cast<float>(static_cast<double>(v) * (1.0 / 255.0));
      plan.lut[c * 256 + v] = (x - mc) / sc;
    }
  }
  return plan;
}

PackedOffsets packed_offsets(const VariantPlan& plan) {
  PackedOffsets o{};
  o.meta = 0;
  o.frame_idx = o.meta + static_cast<int64_t>(plan.meta.size()) * 16;
  o.bounds = o.frame_idx + static_cast<int64_t>(plan.frame_idx.size());
  o.coefs = o.bounds + static_cast<int64_t>(plan.bounds.size());
  o.lut = (o.coefs + static_cast<int64_t>(plan.coefs.size()) + 3) / 4 * 4;  // 16-byte aligned table
  o.total = o.lut + 3 * 256;
  return o;
}

void pack_plan(const VariantPlan& plan, int32_t* dst) {
  const PackedOffsets o = packed_offsets(plan);
  std::memset(dst, 0, static_cast<size_t>(o.total) * sizeof(int32_t));
  std::memcpy(dst + o.meta, plan.meta.data(), plan.meta.size() * sizeof(VariantMeta));
  std::memcpy(dst + o.frame_idx, plan.frame_idx.data(), plan.frame_idx.size() * sizeof(int32_t));
  std::memcpy(dst + o.bounds, plan.bounds.data(), plan.bounds.size() * sizeof(int32_t));
  std::memcpy(dst + o.coefs, plan.coefs.data(), plan.coefs.size() * sizeof(int32_t));
  std::memcpy(dst + o.lut, plan.lut.data(), plan.lut.size() * sizeof(float));
}

}  // namespace strive
