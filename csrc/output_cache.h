// Memory for large CPU outputs, reused across calls.
//
// Why: a training step's pixel_values is 50-500 MB. glibc serves blocks that large by mmap and returns
// them with munmap, so every call pays first-touch page faults and kernel zeroing of fresh pages --
// measured 80 ms for 150 MB against 30 ms to rewrite memory already mapped, on the 2-core CI machine,
// where the whole CPU op takes ~130 ms. (Small per-image arrays, like HF's, stay in malloc's heap and
// never pay this.) So blocks of at least 16 MB are kept when their tensor dies -- at most 2 blocks and
// 2 GiB -- and handed to the next output of about the same size (up to 1.5x larger). Set
// STRIVE_CPU_OUTPUT_CACHE=0 to allocate every output with at::empty instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

namespace strive {

// An uninitialised contiguous CPU tensor, like at::empty(sizes, dtype).
at::Tensor empty_cpu_output(c10::IntArrayRef sizes, c10::ScalarType dtype);

// Bytes currently held by the cache (for tests and diagnostics).
int64_t output_cache_bytes();

}  // namespace strive
