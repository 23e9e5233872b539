// SparseK selection on the CPU: Sel(p0), gates, tau(p0) and |F| for every query block.
//
// Cost per (batch, kv head) row of N keys, T query blocks, budget K:
//   O(N log N)        sort the eligible keys once by (score, position) and insert each into
//                     two Fenwick trees over that order (count and sum of scores);
//   O(T log^2 N)      tau(p0): two binary searches over the sorted breakpoints, each step
//                     evaluating sum clip(u - tau, 0, 1) in O(log N) from the trees;
//   O(T (K + b))      Sel(p0) = top-K of Sel(p0 - b) + the b new candidates (a key that drops out
//                     of the top K never comes back, since candidates only accumulate); this is
//                     also the size of the output.
// Nothing grows like N^2: rows run in parallel, blocks of a row in order (tau only rises).
#include "../sparsek.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace sparsek {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Fenwick tree over the rank order: count and sum of (score - shift) of the inserted keys.
class RankTree {
 public:
  explicit RankTree(int64_t n) : count_(n + 1, 0), sum_(n + 1, 0.0) {}
  void insert(int64_t rank, double value) {
    for (int64_t i = rank + 1; i < static_cast<int64_t>(count_.size()); i += i & -i) {
      count_[i] += 1;
      sum_[i] += value;
    }
  }
  // count and sum over ranks [0, end)
  void prefix(int64_t end, int64_t& count, double& sum) const {
    count = 0;
    sum = 0.0;
    for (int64_t i = end; i > 0; i -= i & -i) {
      count += count_[i];
      sum += sum_[i];
    }
  }

 private:
  std::vector<int64_t> count_;
  std::vector<double> sum_;
};

// One (batch, kv head) row: keys sorted by (score desc, position desc), and the inserted set.
class RowSelector {
 public:
  RowSelector(const float* u, const bool* valid, int64_t last_candidate, int64_t sinks)
      : u_(u), rank_of_(std::max<int64_t>(0, last_candidate + 1), -1), tree_(0) {
    std::vector<int32_t> eligible;
    for (int64_t j = sinks; j <= last_candidate; ++j)
      if (valid == nullptr || valid[j]) eligible.push_back(static_cast<int32_t>(j));
    std::sort(eligible.begin(), eligible.end(), [u](int32_t a, int32_t b) {
      return u[a] != u[b] ? u[a] > u[b] : a > b;
    });
    sorted_u_.resize(eligible.size());
    for (size_t r = 0; r < eligible.size(); ++r) {
      rank_of_[eligible[r]] = static_cast<int32_t>(r);
      sorted_u_[r] = u[eligible[r]];
    }
    shift_ = sorted_u_.empty() ? 0.0 : sorted_u_.front();
    tree_ = RankTree(static_cast<int64_t>(sorted_u_.size()));
  }

  int32_t rank(int64_t j) const { return rank_of_[j]; }
  bool eligible(int64_t j) const { return j < static_cast<int64_t>(rank_of_.size()) && rank_of_[j] >= 0; }
  void insert(int64_t j) {
    tree_.insert(rank_of_[j], static_cast<double>(u_[j]) - shift_);
    ++inserted_;
  }
  int64_t inserted() const { return inserted_; }
  double score_at_rank(int64_t r) const { return sorted_u_[r]; }

  // sum over inserted keys of clip(u - tau, 0, 1), and |F| at tau.
  double mass(double tau, int64_t* nfrac = nullptr) const {
    const Piece piece = piece_at(tau);
    if (nfrac) *nfrac = piece.frac_count;
    return static_cast<double>(piece.ones) + piece.frac_sum - static_cast<double>(piece.frac_count) * (tau - shift_);
  }

  // The tau with mass(tau) = budget, given the budget-th largest candidate score kth.
  // The root lies in [kth - 1, kth). Breakpoints of the piecewise-linear mass inside that
  // interval are scores u in it (kink at tau = u) and scores u in [kth, kth + 1) (kink at
  // tau = u - 1); bisecting each sorted family brackets the root between adjacent kinks, where
  // the mass is linear and the root is solved exactly.
  double solve(double kth, int64_t budget) const {
    double lo = kth - 1.0, hi = kth;
    narrow(lo, hi, budget, 0.0);
    narrow(lo, hi, budget, 1.0);
    const Piece piece = piece_at(0.5 * (lo + hi));
    if (piece.frac_count == 0) return lo;  // the mass is flat (= budget) across the bracket: gates are 0 or 1
    const double tau =
        shift_ + (static_cast<double>(piece.ones) + piece.frac_sum - static_cast<double>(budget)) / piece.frac_count;
    return std::min(std::max(tau, lo), hi);
  }

 private:
  // The linear piece of the mass around tau: inserted keys with u - tau >= 1 (gate 1), and the
  // count and shifted score sum of those with 0 < u - tau < 1 (the fractional set F).
  struct Piece {
    int64_t ones;
    int64_t frac_count;
    double frac_sum;
  };
  Piece piece_at(double tau) const {
    const int64_t ones_end = partition([tau](double x) { return x - tau >= 1.0; });
    const int64_t above_end = partition([tau](double x) { return x - tau > 0.0; });
    int64_t c1, cab;
    double s1, sab;
    tree_.prefix(ones_end, c1, s1);
    tree_.prefix(above_end, cab, sab);
    return {c1, cab - c1, sab - s1};
  }

  template <class Pred>
  int64_t partition(Pred pred) const {
    return std::partition_point(sorted_u_.begin(), sorted_u_.end(), pred) - sorted_u_.begin();
  }

  // Shrink [lo, hi] (mass(lo) >= budget > mass(hi)) to adjacent kinks of the family u - offset.
  void narrow(double& lo, double& hi, int64_t budget, double offset) const {
    // kinks in (lo, hi): sorted_u - offset strictly inside, i.e. ranks [a, b) (descending order)
    int64_t a = partition([&](double x) { return x - offset >= hi; });
    int64_t b = partition([&](double x) { return x - offset > lo; });
    // find the first rank in [a, b) whose kink has mass >= budget (mass rises as the kink falls)
    while (a < b) {
      const int64_t m = a + (b - a) / 2;
      const double kink = sorted_u_[m] - offset;
      if (mass(kink) >= static_cast<double>(budget)) {
        b = m;
      } else {
        a = m + 1;
      }
    }
    if (a < static_cast<int64_t>(sorted_u_.size())) {
      const double kink = sorted_u_[a] - offset;
      if (kink > lo && kink < hi) lo = kink;
    }
    if (a > 0) {
      const double kink = sorted_u_[a - 1] - offset;
      if (kink > lo && kink < hi) hi = kink;
    }
  }

  const float* u_;
  std::vector<int32_t> rank_of_;
  std::vector<double> sorted_u_;
  double shift_ = 0.0;
  RankTree tree_;
  int64_t inserted_ = 0;
};

}  // namespace

Selection select_cpu(const at::Tensor& scores_in, const c10::optional<at::Tensor>& key_valid,
                     const Geometry& geo, int64_t budget, int64_t window, int64_t sinks, bool soft) {
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor valid = key_valid.has_value() ? key_valid->contiguous() : at::Tensor();
  const int64_t batch = scores.size(0), heads = scores.size(1), num_keys = scores.size(2);
  const int64_t blocks = geo.num_blocks, width = geo.width;
  auto opts = scores.options();
  Selection sel{
      at::full({batch, heads, blocks, width}, -1, opts.dtype(at::kInt)),
      at::zeros({batch, heads, blocks, width}, opts.dtype(at::kFloat)),
      at::zeros({batch, heads, blocks}, opts.dtype(at::kInt)),
      at::empty({batch, heads, blocks}, opts.dtype(at::kDouble)),
      at::zeros({batch, heads, blocks}, opts.dtype(at::kInt)),
  };
  if (blocks == 0) return sel;
  const int64_t last_candidate = std::min(num_keys - 1, geo.block_start(blocks - 1) - window);

  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> chosen, merged, ranks;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / heads;
      const float* u = scores.data_ptr<float>() + row * num_keys;
      const bool* vrow = valid.defined() ? valid.data_ptr<bool>() + b * num_keys : nullptr;
      RowSelector selector(u, vrow, last_candidate, sinks);
      int32_t* idx = sel.idx.data_ptr<int32_t>() + row * blocks * width;
      float* gate = sel.gate.data_ptr<float>() + row * blocks * width;
      int32_t* count = sel.count.data_ptr<int32_t>() + row * blocks;
      double* tau = sel.tau.data_ptr<double>() + row * blocks;
      int32_t* nfrac = sel.nfrac.data_ptr<int32_t>() + row * blocks;

      chosen.clear();
      int64_t next_key = sinks;  // keys below next_key were already offered as candidates
      double last_tau = -kInf;
      for (int64_t t = 0; t < blocks; ++t) {
        merged = chosen;
        for (const int64_t limit = geo.block_start(t) - window; next_key <= limit; ++next_key) {
          if (selector.eligible(next_key)) {
            selector.insert(next_key);
            merged.push_back(static_cast<int32_t>(next_key));
          }
        }
        double block_tau = -kInf;
        int64_t block_nfrac = 0;
        if (selector.inserted() <= budget) {
          chosen = merged;
        } else if (budget == 0) {
          chosen.clear();
          block_tau = kInf;
        } else {
          ranks.resize(merged.size());
          for (size_t i = 0; i < merged.size(); ++i) ranks[i] = selector.rank(merged[i]);
          std::nth_element(ranks.begin(), ranks.begin() + (budget - 1), ranks.end());
          const int32_t kth_rank = ranks[budget - 1];
          chosen.clear();
          for (int32_t j : merged)
            if (selector.rank(j) <= kth_rank) chosen.push_back(j);
          // tau never falls as candidates accumulate; the max only absorbs rounding.
          block_tau = std::max(last_tau, selector.solve(selector.score_at_rank(kth_rank), budget));
          selector.mass(block_tau, &block_nfrac);
        }
        last_tau = block_tau;
        tau[t] = block_tau;
        nfrac[t] = static_cast<int32_t>(block_nfrac);
        count[t] = static_cast<int32_t>(chosen.size());
        const bool finite_tau = std::isfinite(block_tau);
        for (size_t s = 0; s < chosen.size(); ++s) {
          idx[t * width + s] = chosen[s];
          double g = 1.0;
          if (soft && finite_tau) g = std::min(1.0, std::max(0.0, static_cast<double>(u[chosen[s]]) - block_tau));
          gate[t * width + s] = static_cast<float>(g);
        }
      }
    }
  });
  return sel;
}

}  // namespace sparsek
