// Memory for large CPU outputs, reused across calls; see output_cache.h for why.
#include "output_cache.h"

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

namespace strive {
namespace {

constexpr size_t kMinBytes = size_t(16) << 20;       // smaller outputs: malloc's heap already reuses them
constexpr size_t kMaxBlocks = 2;                     // current + previous step's output
constexpr size_t kMaxCachedBytes = size_t(2) << 30;  // never hold more than this while idle
constexpr size_t kPage = 4096;

struct Block {
  void* ptr;
  size_t bytes;
};

class Cache {
 public:
  Cache() {
    const char* v = std::getenv("STRIVE_CPU_OUTPUT_CACHE");
    enabled_ = v == nullptr || std::string(v) != "0";
  }
  bool enabled() const { return enabled_; }

  // The smallest free block of at least `bytes` and at most 1.5x that (else nullptr).
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t b = free_[i].bytes;
      if (b >= bytes && b <= bytes + bytes / 2 && (best == free_.size() || b < free_[best].bytes)) best = i;
    }
    if (best == free_.size()) return {nullptr, 0};
    const Block block = free_[best];
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    held_ -= block.bytes;
    return block;
  }

  // Keep a dead output's block, evicting the oldest blocks to stay within the limits.
  void give(Block block) {
    std::vector<void*> evict;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(block);
      held_ += block.bytes;
      while (free_.size() > kMaxBlocks || held_ > kMaxCachedBytes) {
        evict.push_back(free_.front().ptr);
        held_ -= free_.front().bytes;
        free_.erase(free_.begin());
      }
    }
    for (void* p : evict) std::free(p);
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(held_);
  }

 private:
  bool enabled_ = true;
  std::mutex mu_;
  std::vector<Block> free_;
  size_t held_ = 0;
};

// Never destroyed: tensors holding cached blocks may be freed after static destructors ran.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

}  // namespace

at::Tensor empty_cpu_output(c10::IntArrayRef sizes, c10::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (!cache().enabled() || bytes < kMinBytes) return at::empty(sizes, options);
  Block block = cache().take(bytes);
  if (block.ptr == nullptr) {
    block.bytes = (bytes + kPage - 1) / kPage * kPage;
    block.ptr = std::aligned_alloc(kPage, block.bytes);
    TORCH_CHECK(block.ptr != nullptr, "variant_patchify: out of memory allocating ", block.bytes,
                " bytes for pixel_values");
  }
  return at::from_blob(block.ptr, sizes, [block](void*) { cache().give(block); }, options);
}

int64_t output_cache_bytes() { return cache().held(); }

}  // namespace strive
