// CUDA kernel of the variant op: one launch for all K variants, one block per output tile of
// (patch*merge)^2 pixels (one merged patch = merge^2 Qwen patches) of one temporal step.
//
// Per block and source frame (slots of a temporal step that repeat a frame reuse the result):
//   the tile's weights and the normalisation table live in shared memory for the whole block;
//   stage R source rows of the tile's column span into shared memory (coalesced, 16-byte loads),
//   horizontal pass for the staged rows (Pillow fixed point, rounded to uint8) into shared memory,
//   vertical pass accumulated in registers (int32, exact: order does not matter), next R rows ...
//   then clip, normalise through the (3, 256) table in shared memory and write the patches: threads are
//   numbered in patch order, so a warp writes contiguous runs of each (channel, slot) 14x14 block.
// The plan (weights, bounds, frame table, table) is built on the host (variant_plan.cpp, bit-identical to
// the CPU kernel's) and uploaded by variant_cuda_api.cpp; this file needs nothing but the CUDA toolkit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "variant_params.h"

namespace strive {
namespace {

__device__ __forceinline__ uint8_t clip8_dev(int32_t acc) {
  acc >>= kPrecisionBits;
  return static_cast<uint8_t>(acc < 0 ? 0 : (acc > 255 ? 255 : acc));
}

// float -> output dtype, round to nearest even (as torch's .to(dtype) and the CPU kernel's c10 types)
template <typename out_t>
__device__ __forceinline__ out_t to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }

// kThreads: the block size (256 for tiles up to 32x32, 1024 up to 64x64), also the register budget.
template <typename out_t, int kThreads>
__global__ void __launch_bounds__(kThreads, kThreads == 256 ? 3 : 1) variant_patchify_kernel(const CudaParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int T = p.tile, R = p.rows_per_stage;
  float* lut = reinterpret_cast<float*>(smem);                  // 3 * 256 normalisation table
  int32_t* shift = reinterpret_cast<int32_t*>(lut + 3 * 256);  // R: alignment shift of each staged row
  int32_t* wh = shift + kCudaMaxStageRows;                      // T x ksize_h: the tile's column weights
  int32_t* wv = wh + T * p.max_ksize_h;                         // T x ksize_v: the tile's row weights
  int32_t* bcol = wv + T * p.max_ksize_v;                       // T x 2: (first tap - cs0, tap count)
  uint8_t* stage = smem + cuda_smem_tables_bytes(T, p.max_ksize_h, p.max_ksize_v);  // R x stage_stride
  uint8_t* hres = stage + static_cast<int64_t>(R) * p.stage_stride;                  // R x T x 3

  const VariantMeta* metas = reinterpret_cast<const VariantMeta*>(p.plan);
  const int32_t* bounds = p.plan + p.off_bounds;
  const int32_t* coefs = p.plan + p.off_coefs;
  for (int i = threadIdx.x; i < 3 * 256; i += blockDim.x) lut[i] = __int_as_float(p.plan[p.off_lut + i]);

  // Which variant / temporal step / tile: last variant whose first_tile <= blockIdx.x.
  int lo = 0, hi = p.K - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (metas[mid].first_tile <= static_cast<int32_t>(blockIdx.x)) lo = mid; else hi = mid - 1;
  }
  const VariantMeta m = metas[lo];
  const int tiles_x = m.out_w / T, tiles_y = m.out_h / T;
  const int local = blockIdx.x - m.first_tile;
  const int tx = local % tiles_x, ty = (local / tiles_x) % tiles_y, t = local / (tiles_x * tiles_y);
  const int32_t* bh = bounds + m.bounds_h;
  const int32_t* bv = bounds + m.bounds_v;
  const int32_t* kh = coefs + m.coef_h;
  const int32_t* kv = coefs + m.coef_v;
  const int ys0 = bv[2 * (ty * T)], ys1 = bv[2 * (ty * T + T - 1)] + bv[2 * (ty * T + T - 1) + 1];
  const int cs0 = bh[2 * (tx * T)], cs1 = bh[2 * (tx * T + T - 1)] + bh[2 * (tx * T + T - 1) + 1];
  const int span = 3 * (cs1 - cs0);  // bytes of one staged source row
  // The tile's weights: T consecutive columns / rows are contiguous in the plan (coalesced copy).
  const int32_t* kh_tile = kh + static_cast<int64_t>(tx) * T * m.ksize_h;
  const int32_t* kv_tile = kv + static_cast<int64_t>(ty) * T * m.ksize_v;
  for (int i = threadIdx.x; i < T * m.ksize_h; i += blockDim.x) wh[i] = kh_tile[i];
  for (int i = threadIdx.x; i < T * m.ksize_v; i += blockDim.x) wv[i] = kv_tile[i];
  for (int i = threadIdx.x; i < T; i += blockDim.x) {
    bcol[2 * i] = bh[2 * (tx * T + i)] - cs0;
    bcol[2 * i + 1] = bh[2 * (tx * T + i) + 1];
  }

  // My output pixels, numbered in patch order (m1, m2, py, px) so warps write contiguous runs.
  const int ps = p.patch, pp = ps * ps, M = p.merge, npix = T * T;
  int ymin[kCudaMaxPixPerThread], ylen[kCudaMaxPixPerThread];
  int32_t acc[kCudaMaxPixPerThread][3];
  uint8_t val[kCudaMaxPixPerThread][3];
#pragma unroll
  for (int i = 0; i < kCudaMaxPixPerThread; ++i) {
    const int pix = threadIdx.x + i * blockDim.x;
    const int pm = pix / pp, yo = ty * T + (pm / M) * ps + (pix % pp) / ps;
    ymin[i] = pix < npix ? bv[2 * yo] : 0;
    ylen[i] = pix < npix ? bv[2 * yo + 1] : 0;
  }

  int prev = -1;
  for (int slot = 0; slot < p.tps; ++slot) {
    const int f = p.plan[p.off_frame_idx + m.frames + t * p.tps + slot];
    if (f != prev) {
#pragma unroll
      for (int i = 0; i < kCudaMaxPixPerThread; ++i) acc[i][0] = acc[i][1] = acc[i][2] = kRoundHalf;
      const uint8_t* frame = p.frames + f * p.frame_stride + (static_cast<int64_t>(m.hx0) + cs0) * 3;
      for (int r0 = ys0; r0 < ys1; r0 += R) {
        const int nr = min(R, ys1 - r0);
        __syncthreads();  // previous stage fully consumed (and lut written, first time)
        // 1. stage rows r0 .. r0+nr: 16-byte aligned chunks covering [row, row + span)
        const int chunks = (span + 15 + 15) / 16;
        for (int w = threadIdx.x; w < nr * chunks; w += blockDim.x) {
          const int r = w / chunks, c = w % chunks;
          const uint8_t* row = frame + (m.hy0 + r0 + r) * p.row_stride;
          const uint8_t* base = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t(15));
          if (c == 0) shift[r] = static_cast<int32_t>(row - base);
          const uint8_t* src = base + 16 * c;
          uint8_t* dst = stage + r * p.stage_stride + 16 * c;
          if (src >= row + span) continue;
          if (src >= p.frames && src + 16 <= p.frames_end) {
            *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
          } else {  // first / last bytes of the tensor: byte loads inside the row only
            for (int b = 0; b < 16; ++b) {
              if (src + b >= row && src + b < row + span) dst[b] = src[b];
            }
          }
        }
        __syncthreads();
        // 2. horizontal pass of the staged rows for the tile's T columns -> hres (uint8, like Pillow)
        for (int w = threadIdx.x; w < nr * T; w += blockDim.x) {
          const int r = w / T, xl = w % T;
          const int n = bcol[2 * xl + 1];
          const int32_t* k = wh + xl * m.ksize_h;
          const uint8_t* s = stage + r * p.stage_stride + shift[r] + 3 * bcol[2 * xl];
          int32_t a0 = kRoundHalf, a1 = kRoundHalf, a2 = kRoundHalf;
          for (int j = 0; j < n; ++j) {
            const int32_t kj = k[j];
            a0 += s[3 * j] * kj, a1 += s[3 * j + 1] * kj, a2 += s[3 * j + 2] * kj;
          }
          uint8_t* h = hres + 3 * (r * T + xl);
          h[0] = clip8_dev(a0), h[1] = clip8_dev(a1), h[2] = clip8_dev(a2);
        }
        __syncthreads();
        // 3. vertical pass: the staged rows that fall in each of my pixels' windows
#pragma unroll
        for (int i = 0; i < kCudaMaxPixPerThread; ++i) {
          const int pix = threadIdx.x + i * blockDim.x;
          if (pix >= npix) continue;
          const int pm = pix / pp, yl = (pm / M) * ps + (pix % pp) / ps;
          const int xl = (pm % M) * ps + pix % ps;
          const int rb = max(ymin[i], r0), re = min(ymin[i] + ylen[i], r0 + nr);
          const int32_t* k = wv + yl * m.ksize_v;
          for (int r = rb; r < re; ++r) {
            const int32_t kr = k[r - ymin[i]];
            const uint8_t* h = hres + 3 * ((r - r0) * T + xl);
            acc[i][0] += h[0] * kr, acc[i][1] += h[1] * kr, acc[i][2] += h[2] * kr;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kCudaMaxPixPerThread; ++i) {
#pragma unroll
        for (int c = 0; c < 3; ++c) val[i][c] = clip8_dev(acc[i][c]);
      }
    }
    prev = f;
    __syncthreads();  // lut visible even when no stage ran for this slot
    // 4. normalise and write slot `slot` of the tile's merge^2 patches
    out_t* out = static_cast<out_t*>(p.out);
    const int64_t first = m.patch_row + ((static_cast<int64_t>(t) * tiles_y + ty) * tiles_x + tx) * M * M;
#pragma unroll
    for (int i = 0; i < kCudaMaxPixPerThread; ++i) {
      const int pix = threadIdx.x + i * blockDim.x;
      if (pix >= npix) continue;
      out_t* dst = out + (first + pix / pp) * p.patch_dim + slot * pp + pix % pp;
#pragma unroll
      for (int c = 0; c < 3; ++c) dst[c * p.tps * pp] = to_out<out_t>(lut[c * 256 + val[i][c]]);
    }
  }
}

template <typename out_t>
int launch(const CudaParams& p, int threads, size_t smem, cudaStream_t stream) {
  auto kernel = threads <= 256 ? variant_patchify_kernel<out_t, 256> : variant_patchify_kernel<out_t, 1024>;
  if (smem > (48 << 10)) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  kernel<<<static_cast<unsigned>(p.num_tiles), threads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_variant_patchify_cuda(const CudaParams& p, int threads, size_t smem, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case OutDtype::kFloat32: return launch<float>(p, threads, smem, s);
    case OutDtype::kBFloat16: return launch<__nv_bfloat16>(p, threads, smem, s);
    case OutDtype::kFloat16: return launch<__half>(p, threads, smem, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace strive
