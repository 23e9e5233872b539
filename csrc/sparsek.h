// SparseK attention: declarations shared by the CPU and CUDA backends.
//
// The function computed is ../shared/SPEC.md (copied into docs/SPEC.md). Every backend splits the
// work the same way:
//   select  per (batch, kv head, query block): the top-K candidate keys Sel(p0), their gates, the
//           threshold tau(p0) and the size of the fractional set |F| (for the score gradient);
//   fwd     per (batch, kv head, query block): attention of every query head of the GQA group over
//           sinks + Sel + window, returning out and the row log-sum-exp;
//   bwd     recomputes the probabilities from lse and returns dq, dk, dv and d scores.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

namespace sparsek {

// Query blocks touched by one call: queries sit at positions num_keys - num_queries + r.
struct Geometry {
  int64_t num_queries;
  int64_t num_keys;
  int64_t block_q;
  int64_t first_block;  // index t of the first query block
  int64_t num_blocks;   // number of query blocks holding a query of this call
  int64_t width;        // length of the per-block selection list (<= budget)

  int64_t query_start() const { return num_keys - num_queries; }
  int64_t block_start(int64_t local_block) const { return (first_block + local_block) * block_q; }
};

Geometry make_geometry(int64_t num_queries, int64_t num_keys, int64_t budget, int64_t window,
                       int64_t sinks, int64_t block_q);

// The selection of every query block of a call; index tensors are [B, Hkv, T(, width)].
struct Selection {
  at::Tensor idx;    // int32, positions of Sel(p0) ascending, -1 past count
  at::Tensor gate;   // float32, gates of Sel(p0), 0 past count
  at::Tensor count;  // int32, |Sel(p0)|
  at::Tensor tau;    // float64, -inf where |C(p0)| <= K (+inf for K = 0); non-decreasing in t
  at::Tensor nfrac;  // int32, |F|: candidates with 0 < u - tau < 1
};

// Error messages are assembled from std::string pieces and handed to TORCH_CHECK_* as one string.
// Streaming integers or sizes into TORCH_CHECK's std::ostream crashed inside the extension on the
// GPU machine's image (csrc/cuda/NOTES.md); formatting them ourselves keeps every error an error.
namespace detail {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T x) {
  return std::to_string(x);
}
inline std::string piece(double x) { return std::to_string(x); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}
template <class... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}
}  // namespace detail

#define SPARSEK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::sparsek::detail::message(__VA_ARGS__))
#define SPARSEK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::sparsek::detail::message(__VA_ARGS__))

// A candidate of the fractional set F at threshold tau (0 < u - tau < 1). Selection, gates and the
// backward all use this one test so they agree to the last bit.
inline bool is_fractional(double u, double tau) {
  const double excess = u - tau;
  return excess > 0.0 && excess < 1.0;
}

// Argument checks shared by all backends; they raise ValueError / TypeError with the argument's
// name and what was expected.
void check_selection_settings(int64_t budget, int64_t window, int64_t sinks, int64_t block_q);
void check_selection_args(const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                          int64_t num_queries, int64_t budget, int64_t window, int64_t sinks,
                          int64_t block_q);
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                          int64_t budget, int64_t window, int64_t sinks, int64_t block_q);

// CPU backend.
Selection select_cpu(const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                     const Geometry& geo, int64_t budget, int64_t window, int64_t sinks, bool soft);

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& key_valid,
                                                     const Selection& sel, const Geometry& geo,
                                                     int64_t window, int64_t sinks, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& scores,
    const c10::optional<at::Tensor>& key_valid, const Selection& sel, const Geometry& geo,
    int64_t window, int64_t sinks, double scale, bool soft, bool scores_grad);

// d scores from the per-slot gate gradients dgate [B, Hkv, T, width] (CPU; used by both backends'
// final step when the selection lives on the CPU).
at::Tensor scores_grad_cpu(const at::Tensor& dgate, const at::Tensor& scores,
                           const c10::optional<at::Tensor>& key_valid, const Selection& sel,
                           const Geometry& geo, int64_t window, int64_t sinks);

}  // namespace sparsek
