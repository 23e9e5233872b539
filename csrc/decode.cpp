// SparseK over a compacted KV cache: the decode path of sparsek_hf.SparseKCache.
//
// A compacted cache no longer holds key j at index j: every (batch, kv head) row keeps only the
// keys that can still be attended (sinks, the window, the current selection, candidates that may
// still be selected) at arbitrary slots, with their absolute positions in key_pos (-1 = empty
// slot). Candidates that can never be selected again but still count towards tau are kept as
// score-only records (tail_scores, -inf = empty). The two operators here compute SPEC.md on that
// layout:
//
//   decode_select  Sel(p0), gates and tau(p0) of every query block of the call, per cache slot;
//   decode_attend  softmax attention over the slots given those gates, returning (out, lse): the
//                  per-token step, since a block's selection holds for all of its block_q tokens;
//   decode         decode_select + decode_attend.
//
// Decoding is inference-only and small (a few query rows against a cache of bounded size), so both
// are written with ATen tensor ops and registered for CompositeExplicitAutograd: one
// implementation serves the CPU and CUDA alike. The cost per call is O(T * C log C) for the
// selection and O(Nq * Hq * C * D) for the attention, C the cache capacity: constant in the
// number of tokens generated so far.
#include <torch/library.h>

#include <limits>

#include "sparsek.h"

namespace sparsek {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void check_decode_select_args(const at::Tensor& scores, const at::Tensor& key_pos,
                              const c10::optional<at::Tensor>& tail_scores, int64_t query_pos0,
                              int64_t num_queries, int64_t budget, int64_t window, int64_t sinks,
                              int64_t block_q) {
  SPARSEK_CHECK_VALUE(scores.dim() == 3, "scores must be 3-D [B, Hkv, C], got shape ", scores.sizes());
  SPARSEK_CHECK_TYPE(scores.scalar_type() == at::kFloat, "scores must be float32, got ", scores.scalar_type());
  SPARSEK_CHECK_VALUE(key_pos.sizes() == scores.sizes(), "key_pos must have the shape of scores ", scores.sizes(),
                    ", got ", key_pos.sizes());
  SPARSEK_CHECK_TYPE(key_pos.scalar_type() == at::kLong, "key_pos must be int64, got ", key_pos.scalar_type());
  SPARSEK_CHECK_VALUE(key_pos.device() == scores.device(), "key_pos must be on ", scores.device(), ", got ",
                    key_pos.device());
  if (tail_scores.has_value()) {
    const auto& tail = *tail_scores;
    SPARSEK_CHECK_TYPE(tail.scalar_type() == at::kFloat, "tail_scores must be float32, got ", tail.scalar_type());
    SPARSEK_CHECK_VALUE(tail.dim() == 3 && tail.size(0) == scores.size(0) && tail.size(1) == scores.size(1),
                      "tail_scores must have shape [B, Hkv, R] = [", scores.size(0), ", ", scores.size(1),
                      ", R], got ", tail.sizes());
    SPARSEK_CHECK_VALUE(tail.device() == scores.device(), "tail_scores must be on ", scores.device(), ", got ",
                      tail.device());
  }
  SPARSEK_CHECK_VALUE(query_pos0 >= 0, "query_pos0 must be >= 0, got ", query_pos0);
  SPARSEK_CHECK_VALUE(num_queries >= 1, "num_queries must be >= 1, got ", num_queries);
  check_selection_settings(budget, window, sinks, block_q);
}

// Starts p0 of the query blocks touched by queries at positions query_pos0 .. + num_queries - 1.
at::Tensor block_starts(int64_t query_pos0, int64_t num_queries, int64_t block_q, const at::TensorOptions& opts) {
  const int64_t first = query_pos0 / block_q;
  const int64_t last = (query_pos0 + num_queries - 1) / block_q;
  return at::arange(first, last + 1, opts.dtype(at::kLong)) * block_q;
}

// tau with sum_i clip(v_i - tau, 0, 1) = budget over the candidate values v [.., M] (float64,
// -inf = not a candidate), for rows with more than `budget` candidates (others get -inf).
//
// The sum is piecewise linear in tau with kinks at v_i and v_i - 1, and its root lies in
// [v_(K) - 1, v_(K)), v_(K) the K-th largest value. Sorting v lets prefix sums give the sum at
// every kink inside that bracket at once; between the two adjacent kinks around the root the
// fractional set F is fixed and tau = (sum_F v + #ones - K) / |F| exactly. Values are shifted
// by the row maximum first so the prefix sums keep their precision at large positions.
at::Tensor solve_threshold(const at::Tensor& values, const at::Tensor& overfull, int64_t budget) {
  const auto sorted = std::get<0>(values.sort(/*dim=*/-1, /*descending=*/true));
  const auto finite = sorted.isfinite();
  const auto shift = at::where(overfull, sorted.select(-1, 0), 0.0);
  const auto v = at::where(finite, sorted - shift.unsqueeze(-1), -kInf);
  const auto kth = at::where(overfull, v.select(-1, budget - 1), 0.0);
  const auto lo = (kth - 1.0).unsqueeze(-1);
  const auto hi = kth.unsqueeze(-1);

  auto kinks = at::cat({v, v - 1.0, lo, hi}, -1);
  kinks = at::where(kinks.isfinite(), kinks, lo);
  kinks = std::get<0>(at::minimum(at::maximum(kinks, lo), hi).sort(-1));

  // #{v >= y} and #{v > x} by binary search on -v (ascending, +inf where v is -inf).
  const auto neg_v = v.neg().contiguous();
  const auto prefix = at::cat({at::zeros_like(v.narrow(-1, 0, 1)), at::where(finite, v, 0.0).cumsum(-1)}, -1);
  auto mass_terms = [&](const at::Tensor& x) {
    const auto ones = at::searchsorted(neg_v, (-(x + 1.0)).contiguous(), /*out_int32=*/false, /*right=*/true);
    const auto above = at::searchsorted(neg_v, (-x).contiguous(), /*out_int32=*/false, /*right=*/false);
    const auto frac_sum = prefix.gather(-1, above) - prefix.gather(-1, ones);
    return std::make_tuple(ones, above, frac_sum);
  };

  auto [ones, above, frac_sum] = mass_terms(kinks);
  const auto mass = ones.to(at::kDouble) + frac_sum - kinks * (above - ones).to(at::kDouble);
  const int64_t n_kinks = kinks.size(-1);
  // The mass does not increase along the ascending kinks: the root is after the last kink with
  // mass >= budget.
  const auto at_lo = (mass >= static_cast<double>(budget)).sum(-1, /*keepdim=*/true).sub(1).clamp(0, n_kinks - 2);
  const auto x_lo = kinks.gather(-1, at_lo);
  const auto x_hi = kinks.gather(-1, at_lo + 1);
  auto [ones_m, above_m, frac_m] = mass_terms(0.5 * (x_lo + x_hi));
  const auto n_frac = (above_m - ones_m).to(at::kDouble);
  const auto solved = (frac_m + ones_m.to(at::kDouble) - static_cast<double>(budget)) / n_frac.clamp_min(1.0);
  // No fractional candidate between the kinks: the mass is flat (= budget) there, and every gate
  // is 0 or 1 for any tau in the bracket.
  auto tau = at::where(n_frac > 0, solved, x_lo);
  tau = at::minimum(at::maximum(tau, x_lo), x_hi).squeeze(-1) + shift;
  return at::where(overfull, tau, -kInf);
}

std::tuple<at::Tensor, at::Tensor> decode_select_impl(const at::Tensor& scores, const at::Tensor& key_pos,
                                                      const c10::optional<at::Tensor>& tail_scores,
                                                      int64_t query_pos0, int64_t num_queries, int64_t budget,
                                                      int64_t window, int64_t sinks, int64_t block_q, bool soft) {
  check_decode_select_args(scores, key_pos, tail_scores, query_pos0, num_queries, budget, window, sinks, block_q);
  const int64_t batch = scores.size(0), heads = scores.size(1), slots = scores.size(2);
  const auto p0 = block_starts(query_pos0, num_queries, block_q, scores.options());
  const int64_t blocks = p0.size(0);
  const std::vector<int64_t> shape{batch, heads, blocks, slots};

  // Candidates C(p0): sinks <= position <= p0 - window (empty slots have position -1).
  const auto pos = key_pos.unsqueeze(2);
  const auto cand = (pos >= sinks).logical_and(pos <= (p0 - window).unsqueeze(-1));
  const auto u = scores.to(at::kDouble).unsqueeze(2).expand(shape);
  const auto x = at::where(cand, u, -kInf);

  // Sel(p0): the `budget` candidates with the largest (score, position). Order the slots by
  // position descending, then stably by score descending, so ties go to the larger position.
  const auto by_pos = key_pos.argsort(/*stable=*/true, /*dim=*/-1, /*descending=*/true).unsqueeze(2).expand(shape);
  const auto by_score = x.gather(-1, by_pos).argsort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const auto order = by_pos.gather(-1, by_score);
  const auto ranks = at::empty_like(order).scatter_(
      -1, order, at::arange(slots, order.options()).expand(shape));
  const auto selected = cand.logical_and(ranks < budget);

  // tau(p0) counts every candidate: the whole slots and the score-only records.
  at::Tensor all = x;
  if (tail_scores.has_value() && tail_scores->size(-1) > 0) {
    const auto tail = tail_scores->to(at::kDouble).unsqueeze(2).expand({batch, heads, blocks, tail_scores->size(-1)});
    all = at::cat({x, at::where(tail.isfinite(), tail, -kInf)}, -1);
  }
  const auto num_candidates = all.isfinite().sum(-1);
  const auto overfull = num_candidates > budget;
  at::Tensor tau;
  if (budget == 0) {
    tau = at::where(num_candidates > 0, kInf, -kInf).to(at::kDouble);
  } else if (all.size(-1) <= budget) {
    tau = at::full({batch, heads, blocks}, -kInf, scores.options().dtype(at::kDouble));
  } else {
    tau = solve_threshold(all, overfull, budget);
  }

  at::Tensor gate;
  if (soft) {
    gate = at::where(overfull.unsqueeze(-1), (u - tau.unsqueeze(-1)).clamp(0.0, 1.0), 1.0);
  } else {
    gate = at::ones_like(u);
  }
  gate = at::where(selected, gate, 0.0).to(at::kFloat);
  return {gate, tau};
}

void check_cache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& key_pos) {
  SPARSEK_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, Hq, Nq, D], got shape ", q.sizes());
  SPARSEK_CHECK_VALUE(k_cache.dim() == 4, "k_cache must be 4-D [B, Hkv, C, D], got shape ", k_cache.sizes());
  SPARSEK_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  SPARSEK_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                   "q, k_cache and v_cache must share one dtype, got ", q.scalar_type(), ", ",
                   k_cache.scalar_type(), ", ", v_cache.scalar_type());
  SPARSEK_CHECK_VALUE(k_cache.device() == q.device() && v_cache.device() == q.device() && key_pos.device() == q.device(),
                    "q, k_cache, v_cache and key_pos must be on one device");
  SPARSEK_CHECK_VALUE(q.size(2) >= 1, "q must hold at least one query");
  SPARSEK_CHECK_VALUE(k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(3),
                    "k_cache must be [B, Hkv, C, D] with q's B (", q.size(0), ") and D (", q.size(3), "), got ",
                    k_cache.sizes());
  SPARSEK_CHECK_VALUE(k_cache.size(1) >= 1 && q.size(1) % k_cache.size(1) == 0, "the query heads Hq (", q.size(1),
                    ") must be a multiple of the kv heads Hkv (", k_cache.size(1), ")");
  SPARSEK_CHECK_VALUE(key_pos.dim() == 3 && key_pos.size(0) == k_cache.size(0) && key_pos.size(1) == k_cache.size(1) &&
                        key_pos.size(2) == k_cache.size(2),
                    "key_pos must have shape [B, Hkv, C] = [", k_cache.size(0), ", ", k_cache.size(1), ", ",
                    k_cache.size(2), "], got ", key_pos.sizes());
  SPARSEK_CHECK_TYPE(key_pos.scalar_type() == at::kLong, "key_pos must be int64, got ", key_pos.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> decode_attend_impl(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& key_pos,
                                                      const at::Tensor& gate, int64_t query_pos0, int64_t window,
                                                      int64_t sinks, int64_t block_q, double scale) {
  check_cache_args(q, k_cache, v_cache, key_pos);
  SPARSEK_CHECK_VALUE(query_pos0 >= 0, "query_pos0 must be >= 0, got ", query_pos0);
  SPARSEK_CHECK_VALUE(window >= 0 && sinks >= 0 && block_q >= 1, "window and sinks must be >= 0 and block_q >= 1");
  const int64_t batch = q.size(0), q_heads = q.size(1), num_queries = q.size(2), head_dim = q.size(3);
  const int64_t heads = k_cache.size(1), slots = k_cache.size(2), group = q_heads / heads;
  const int64_t blocks = (query_pos0 + num_queries - 1) / block_q - query_pos0 / block_q + 1;
  SPARSEK_CHECK_VALUE(gate.dim() == 4 && gate.size(0) == batch && gate.size(1) == heads && gate.size(2) == blocks &&
                        gate.size(3) == slots,
                    "gate must have shape [B, Hkv, T, C] = [", batch, ", ", heads, ", ", blocks, ", ", slots,
                    "], got ", gate.sizes());

  // Bias [B, Hkv, Nq, C]: log gate on Sel(p0), 0 on the window and sinks (causal), -inf elsewhere.
  const auto q_pos = at::arange(query_pos0, query_pos0 + num_queries, key_pos.options());
  const auto q_block = at::div(q_pos, block_q, "floor");
  const auto pos = key_pos.unsqueeze(2);
  const auto dense = (pos >= 0)
                         .logical_and(pos <= q_pos.unsqueeze(-1))
                         .logical_and((pos > (q_block * block_q - window).unsqueeze(-1)).logical_or(pos < sinks));
  const auto gate_rows = blocks == 1 ? gate.to(at::kFloat) : gate.to(at::kFloat).index_select(2, q_block - q_block[0]);
  const auto bias = at::where(gate_rows > 0, gate_rows.log(),
                              at::where(dense, 0.0f, -std::numeric_limits<float>::infinity()));

  // The G query heads of a kv head share its slots: fold them into the rows of one matrix product.
  const auto qf = q.to(at::kFloat).reshape({batch, heads, group * num_queries, head_dim});
  auto logits = at::matmul(qf, k_cache.to(at::kFloat).transpose(-1, -2)).mul_(scale);
  logits = logits.view({batch, heads, group, num_queries, slots}).add_(bias.unsqueeze(2));
  auto row_max = std::get<0>(logits.max(-1, /*keepdim=*/true));
  row_max = at::where(row_max.isfinite(), row_max, 0.0f);
  auto probs = logits.sub_(row_max).exp_();
  const auto denom = probs.sum(-1, /*keepdim=*/true);
  auto out = at::matmul(probs.view({batch, heads, group * num_queries, slots}), v_cache.to(at::kFloat));
  out = out.view({batch, heads, group, num_queries, head_dim});
  out = at::where(denom > 0, out / denom, 0.0f);
  const auto lse = (row_max + denom.log()).squeeze(-1);
  return {out.reshape({batch, q_heads, num_queries, head_dim}).to(q.scalar_type()),
          lse.reshape({batch, q_heads, num_queries})};
}

std::tuple<at::Tensor, at::Tensor> decode_impl(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& scores,
                                               const at::Tensor& key_pos, const c10::optional<at::Tensor>& tail_scores,
                                               int64_t query_pos0, int64_t budget, int64_t window, int64_t sinks,
                                               int64_t block_q, double scale, bool soft) {
  check_cache_args(q, k_cache, v_cache, key_pos);
  SPARSEK_CHECK_VALUE(scores.sizes() == key_pos.sizes(), "scores must have shape [B, Hkv, C] = ", key_pos.sizes(),
                    ", got ", scores.sizes());
  auto [gate, tau] = decode_select_impl(scores, key_pos, tail_scores, query_pos0, q.size(2), budget, window, sinks,
                                        block_q, soft);
  return decode_attend_impl(q, k_cache, v_cache, key_pos, gate, query_pos0, window, sinks, block_q, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsek, m) {
  m.def(
      "decode_select(Tensor scores, Tensor key_pos, Tensor? tail_scores, int query_pos0, int num_queries, "
      "int budget, int window, int sinks, int block_q, bool soft) -> (Tensor gate, Tensor tau)");
  m.def(
      "decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor scores, Tensor key_pos, Tensor? tail_scores, "
      "int query_pos0, int budget, int window, int sinks, int block_q, float scale, bool soft) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "decode_attend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_pos, Tensor gate, int query_pos0, "
      "int window, int sinks, int block_q, float scale) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(sparsek, CompositeExplicitAutograd, m) {
  m.impl("decode_select", &decode_select_impl);
  m.impl("decode", &decode_impl);
  m.impl("decode_attend", &decode_attend_impl);
}

}  // namespace sparsek
