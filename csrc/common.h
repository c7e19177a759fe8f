// Shared checks for the extension's ops. The public ops (cmfast/ops/) validate user input with friendly
// messages; these checks only guard the raw kernels against being handed a layout they would mis-index.
#pragma once
#include <ATen/core/Tensor.h>

namespace cmfast {

// Dense, batch-outermost, and laid out exactly like `like`: the kernels then treat the tensor as a flat
// [batch, numel / batch] array whatever its memory format (contiguous or channels_last).
inline void check_flat(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, ": expected a dense tensor");
  TORCH_CHECK(t.sizes() == like.sizes() && t.strides() == like.strides(), name,
              ": expected the sizes and strides of x");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
  if (t.dim() > 0 && t.size(0) > 1) {
    TORCH_CHECK(t.stride(0) * t.size(0) == t.numel(), name, ": the batch dimension must be outermost in memory");
  }
}

// A per-sample fp32 vector of length `batch` on the device of `like`.
inline void check_per_sample(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == (like.dim() > 0 ? like.size(0) : 1), name,
              ": expected shape (batch,)");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, ": expected contiguous float32");
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

inline int64_t batch_of(const at::Tensor& t) { return t.dim() > 0 ? t.size(0) : 1; }

}  // namespace cmfast
