// Shared checks for the extension's ops. The public ops (cmfast/ops/) validate user input with friendly
// messages; these checks only guard the raw kernels against being handed a layout they would mis-index.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>

#ifdef CMFAST_WITH_CUDA
#include <cuda_runtime_api.h>

#include "../kernels/dtypes.cuh"
#endif

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

// Calls fn(T{}) with T the C++ type of a float32/float16/bfloat16 tensor.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// An optional fp32 parameter (weight, embedding, ...): contiguous, of `shape`, on the device of `like`.
// Returns its data, or nullptr when it is absent.
inline const float* optional_f32(const std::optional<at::Tensor>& t, at::IntArrayRef shape, const at::Tensor& like,
                                 const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->sizes() == shape, name, ": expected shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), name, ": expected contiguous float32");
  TORCH_CHECK(t->device() == like.device(), name, ": expected device ", like.device(), ", got ", t->device());
  return t->const_data_ptr<float>();
}

#ifdef CMFAST_WITH_CUDA
// The kernels' storage type of a float32/float16/bfloat16 tensor.
inline DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace cmfast
