// Argument checks and query-block geometry shared by every backend.
#include "sparsek.h"

#include <algorithm>

namespace sparsek {

Geometry make_geometry(int64_t num_queries, int64_t num_keys, int64_t budget, int64_t window,
                       int64_t sinks, int64_t block_q) {
  Geometry g{num_queries, num_keys, block_q, 0, 0, 0};
  if (num_queries == 0) return g;
  g.first_block = (num_keys - num_queries) / block_q;
  g.num_blocks = (num_keys - 1) / block_q - g.first_block + 1;
  const int64_t last_start = g.block_start(g.num_blocks - 1);
  g.width = std::min(budget, std::max<int64_t>(0, last_start - window - sinks + 1));
  return g;
}

void check_selection_settings(int64_t budget, int64_t window, int64_t sinks, int64_t block_q) {
  SPARSEK_CHECK_VALUE(budget >= 0, "budget must be >= 0, got ", budget);
  SPARSEK_CHECK_VALUE(window >= 0, "window must be >= 0, got ", window);
  SPARSEK_CHECK_VALUE(sinks >= 0, "sinks must be >= 0, got ", sinks);
  SPARSEK_CHECK_VALUE(block_q >= 1, "block_q must be >= 1, got ", block_q);
}

void check_selection_args(const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                          int64_t num_queries, int64_t budget, int64_t window, int64_t sinks,
                          int64_t block_q) {
  SPARSEK_CHECK_VALUE(scores.dim() == 3, "scores must be 3-D [B, Hkv, Nk], got shape ", scores.sizes());
  SPARSEK_CHECK_TYPE(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  check_selection_settings(budget, window, sinks, block_q);
  SPARSEK_CHECK_VALUE(num_queries >= 0 && num_queries <= scores.size(2),
                    "the number of queries must be between 0 and the number of keys (", scores.size(2),
                    "), got ", num_queries);
  if (key_valid.has_value()) {
    const auto& kv = *key_valid;
    SPARSEK_CHECK_TYPE(kv.scalar_type() == at::kBool, "key_valid must be a bool tensor, got ", kv.scalar_type());
    SPARSEK_CHECK_VALUE(kv.dim() == 2 && kv.size(0) == scores.size(0) && kv.size(1) == scores.size(2),
                      "key_valid must have shape [B, Nk] = [", scores.size(0), ", ", scores.size(2),
                      "], got ", kv.sizes());
    SPARSEK_CHECK_VALUE(kv.device() == scores.device(), "key_valid must be on ", scores.device(), ", got ",
                      kv.device());
  }
}

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                          int64_t budget, int64_t window, int64_t sinks, int64_t block_q) {
  SPARSEK_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, Hq, Nq, D], got shape ", q.sizes());
  SPARSEK_CHECK_VALUE(k.dim() == 4, "k must be 4-D [B, Hkv, Nk, D], got shape ", k.sizes());
  SPARSEK_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  SPARSEK_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  SPARSEK_CHECK_VALUE(k.device() == q.device() && v.device() == q.device() && scores.device() == q.device(),
                    "q, k, v and scores must be on one device, got ", q.device(), ", ", k.device(), ", ",
                    v.device(), ", ", scores.device());
  const auto dtype = q.scalar_type();
  if (q.is_cuda()) {
    SPARSEK_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16,
                     "the CUDA kernel takes float16 or bfloat16 q, k, v, got ", dtype);
  } else {
    SPARSEK_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                     "the CPU kernel takes float32, bfloat16 or float16 q, k, v, got ", dtype);
  }
  SPARSEK_CHECK_VALUE(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ", k.size(0));
  SPARSEK_CHECK_VALUE(k.size(3) == q.size(3), "k must have the head dim of q (", q.size(3), "), got ", k.size(3));
  SPARSEK_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= 256, "head dim D must be between 1 and 256, got ", q.size(3));
  SPARSEK_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                    "the query heads Hq (", q.size(1), ") must be a multiple of the kv heads Hkv (", k.size(1), ")");
  SPARSEK_CHECK_VALUE(q.size(2) <= k.size(2), "q cannot have more positions (", q.size(2), ") than k (", k.size(2),
                    "): query r sits at position Nk - Nq + r");
  for (const auto* t : {&q, &k, &v}) {
    SPARSEK_CHECK_VALUE(t->numel() == 0 || t->stride(3) == 1,
                      "q, k and v need a contiguous last dimension (stride 1), got strides ", t->strides());
  }
  SPARSEK_CHECK_VALUE(scores.dim() == 3 && scores.size(0) == k.size(0) && scores.size(1) == k.size(1) &&
                        scores.size(2) == k.size(2),
                    "scores must have shape [B, Hkv, Nk] = [", k.size(0), ", ", k.size(1), ", ", k.size(2),
                    "], got ", scores.sizes());
  check_selection_args(scores, key_valid, q.size(2), budget, window, sinks, block_q);
}

}  // namespace sparsek
