// CPU kernel of the variant op: Pillow-exact bicubic (two fixed-point passes) -> normalise -> Qwen patches.
//
// Work item = (variant, t, band of `tile` output rows = one row of merged patches), pulled dynamically by
// at::parallel_for workers (variants differ in size; static chunks would leave a core idle). Per item and
// distinct source frame of the temporal step (a repeated frame is resampled once):
//   1. horizontal pass over the band's source rows, 16 rows at a time: the rows are transposed so the
//      16 rows x 3 channels of one source column are 48 contiguous bytes; one output column is then
//      sum_j w_j * column(x_j) over 48 int32 lanes (one broadcast weight per tap; variant_cpu_simd.cpp);
//   2. vertical pass, output row by output row, vectorised along the (x, channel) row;
//   3. normalise through the (3, 256) table and write the band's patches, each patch row contiguously.
// Scratch per worker: one band (source rows x out_w x 3 bytes) and tps output bands; the resized video
// never exists. Integer sums are exact, so the result equals Pillow's (and the reference's) bit for bit.
#include "variant_cpu_simd.h"
#include "variant_plan.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace strive {

const char* cpu_isa() { return cpu_passes().isa; }

namespace {

// Per-worker scratch: one band of the horizontally resampled frame, one band of output rows per slot.
struct Scratch {
  std::vector<uint8_t> X, Y, rows, band;
  explicit Scratch(const VariantPlan& p)
      : X((p.max_span_w * 3 + 16) * kLanes),
        Y((p.max_out_w * 3 + 16) * kLanes),
        rows(p.max_band_rows * p.max_out_w * 3 + 64),
        band(p.tps * p.tile * p.max_out_w * 3 + 64) {}
};

// Resample one band (tile output rows, full width) of variant m from `frame` into band (T x out_w x 3).
void resample_band(const VariantPlan& p, const VariantMeta& m, const uint8_t* frame, int64_t yo0, Scratch& s,
                   uint8_t* band) {
  const int32_t* bh = p.bounds.data() + m.bounds_h;
  const int32_t* bv = p.bounds.data() + m.bounds_v;
  const int32_t* kh = p.coefs.data() + m.coef_h;
  const int32_t* kv = p.coefs.data() + m.coef_v;
  const int64_t T = p.tile, ow3 = 3 * static_cast<int64_t>(m.out_w);
  const int64_t ys0 = bv[2 * yo0], ys1 = bv[2 * (yo0 + T - 1)] + bv[2 * (yo0 + T - 1) + 1];
  const int32_t cs0 = bh[0];
  const int64_t span3 = 3 * (static_cast<int64_t>(bh[2 * (m.out_w - 1)]) + bh[2 * (m.out_w - 1) + 1] - cs0);
  const uint8_t* base = frame + (m.hy0 + ys0) * p.row_stride + (static_cast<int64_t>(m.hx0) + cs0) * 3;

  const CpuPasses& P = cpu_passes();
  // 1. horizontal: source rows [ys0, ys1) -> s.rows (rows x out_w x 3)
  const uint8_t* rowp[kLanes];
  for (int64_t r = 0; r < ys1 - ys0; r += kLanes) {
    const int nr = static_cast<int>(std::min<int64_t>(kLanes, ys1 - ys0 - r));
    for (int l = 0; l < kLanes; ++l) rowp[l] = base + (r + std::min(l, nr - 1)) * p.row_stride;  // pad: repeat
    P.transpose_in(rowp, span3, s.X.data());
    // The next block's source rows come from memory (the pool is far larger than the caches): start
    // loading them now, while this block is resampled.
    for (int64_t l = r + kLanes; l < std::min<int64_t>(r + 2 * kLanes, ys1 - ys0); ++l) {
      for (int64_t b = 0; b < span3; b += 64) __builtin_prefetch(base + l * p.row_stride + b);
    }
    P.hpass(s.X.data(), bh, cs0, kh, m.ksize_h, m.out_w, s.Y.data());
    P.transpose_out(s.Y.data(), ow3, s.rows.data() + r * ow3, ow3, nr);
  }
  // 2. vertical: T output rows -> band (T x out_w x 3)
  for (int64_t yl = 0; yl < T; ++yl) {
    const int64_t yo = yo0 + yl;
    P.vpass(s.rows.data() + (bv[2 * yo] - ys0) * ow3, ow3, kv + yo * m.ksize_v, bv[2 * yo + 1], ow3,
            band + yl * ow3);
  }
}

// 3. normalise the tps bands of temporal step t and write their patches, one whole patch row at a time:
//    rows (t, band, bw, m1, m2), features (c, slot, py, px) -- sequential writes (streaming stores were
//    measured slower: the freshly faulted output pages are already in cache). kPs > 0: the patch size
//    as a compile-time constant (14: Qwen2/2.5-VL, 16: Qwen3-VL) so the inner loop unrolls.
template <typename out_t, int kPs>
void write_patches(const VariantPlan& p, const VariantMeta& m, int64_t t, int64_t band,
                   const uint8_t* const* bands, const out_t* lut, out_t* out) {
  const int64_t ps = kPs > 0 ? kPs : p.patch, M = p.merge, T = p.tile, ow3 = 3 * static_cast<int64_t>(m.out_w);
  const int64_t gh = m.out_h / T, gw = m.out_w / T;
  for (int64_t bw = 0; bw < gw; ++bw) {
    for (int64_t m1 = 0; m1 < M; ++m1) {
      for (int64_t m2 = 0; m2 < M; ++m2) {
        const int64_t prow = m.patch_row + ((t * gh + band) * gw + bw) * M * M + m1 * M + m2;
        const int64_t first = m1 * ps * ow3 + (bw * M + m2) * ps * 3;  // top-left pixel of the patch
        out_t* d = out + prow * p.patch_dim;
        for (int c = 0; c < 3; ++c) {
          const out_t* L = lut + c * 256;
          for (int64_t slot = 0; slot < p.tps; ++slot) {
            const uint8_t* src = bands[slot] + first + c;
            for (int64_t py = 0; py < ps; ++py, d += ps, src += ow3) {
              for (int64_t px = 0; px < ps; ++px) d[px] = L[src[3 * px]];
            }
          }
        }
      }
    }
  }
}

template <typename out_t>
void run(const VariantPlan& p, const uint8_t* frames, out_t* out) {
  std::array<out_t, 3 * 256> lut;
  for (size_t i = 0; i < lut.size(); ++i) lut[i] = static_cast<out_t>(p.lut[i]);  // bf16/fp16: RNE like .to()
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.num_bands));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch s(p);
    std::vector<const uint8_t*> bands(p.tps);
    const int64_t band_bytes = p.tile * p.max_out_w * 3;
    for (int64_t item; (item = next.fetch_add(1)) < p.num_bands;) {
      // variant = last one whose first_band <= item
      const auto it = std::upper_bound(p.meta.begin(), p.meta.end(), item,
                                       [](int64_t v, const VariantMeta& m) { return v < m.first_band; });
      const VariantMeta& m = *(it - 1);
      const int64_t per_t = m.out_h / p.tile, local = item - m.first_band;
      const int64_t t = local / per_t, band = local % per_t;
      for (int64_t slot = 0; slot < p.tps; ++slot) {
        const int64_t f = p.frame_idx[m.frames + t * p.tps + slot];
        if (slot > 0 && f == p.frame_idx[m.frames + t * p.tps + slot - 1]) {
          bands[slot] = bands[slot - 1];  // a repeated frame (padding, or a 2-frame clip of one image)
          continue;
        }
        uint8_t* buf = s.band.data() + slot * band_bytes;
        resample_band(p, m, frames + f * p.frame_stride, band * p.tile, s, buf);
        bands[slot] = buf;
      }
      const auto write = p.patch == 14 ? write_patches<out_t, 14>
                         : (p.patch == 16 ? write_patches<out_t, 16> : write_patches<out_t, 0>);
      write(p, m, t, band, bands.data(), lut.data(), out);
    }
  });
}

}  // namespace

void variant_patchify_cpu(const VariantPlan& plan, const at::Tensor& frames, at::Tensor& out) {
  if (plan.num_bands == 0) return;
  const uint8_t* src = frames.const_data_ptr<uint8_t>();
  switch (out.scalar_type()) {
    case at::kFloat: run<float>(plan, src, out.mutable_data_ptr<float>()); break;
    case at::kBFloat16: run<c10::BFloat16>(plan, src, out.mutable_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run<c10::Half>(plan, src, out.mutable_data_ptr<c10::Half>()); break;
    default: TORCH_CHECK_TYPE(false, "variant_patchify: unsupported out dtype ", out.scalar_type());
  }
}

}  // namespace strive
