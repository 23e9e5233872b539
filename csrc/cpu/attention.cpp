// SparseK attention on the CPU: forward and backward over the gathered keys of each query block.
//
// One task is one (batch, kv head, query block): the keys the block may touch (sinks, Sel(p0),
// window) are gathered once into dense [L, D] float tiles and every query head of the GQA group
// attends them through BLAS matrix products, so the work is O(Nq * Hq * (S + K + W + block_q) * D)
// instead of dense attention's O(Nq * Hq * Nk * D). Inputs in bfloat16/float16 are computed in
// float32. Tasks run in parallel with at::parallel_for; the ATen calls inside a task run on one
// thread each.
#include "../sparsek.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace sparsek {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The keys one query block touches, in the order sinks, Sel(p0), window.
struct BlockKeys {
  at::Tensor positions;   // int64 [L]
  at::Tensor bias;        // float [rows, L]: log gate, 0, or -inf (causal / padding in the window)
  int64_t selected_begin = 0;
  int64_t selected_count = 0;
  int64_t rows = 0;       // queries of the call inside the block
  int64_t first_row = 0;  // their first row index r
};

BlockKeys collect_keys(const Geometry& geo, const Selection& sel, const bool* valid, int64_t row,
                       int64_t t, int64_t window, int64_t sinks) {
  BlockKeys bk;
  const int64_t p0 = geo.block_start(t);
  const int64_t first_pos = std::max(p0, geo.query_start());
  const int64_t last_pos = std::min(p0 + geo.block_q, geo.num_keys) - 1;
  bk.rows = last_pos - first_pos + 1;
  bk.first_row = first_pos - geo.query_start();

  std::vector<int64_t> pos;
  const int64_t window_begin = std::max<int64_t>(0, p0 - window + 1);
  for (int64_t j = 0; j < std::min(sinks, window_begin); ++j)
    if (valid == nullptr || valid[j]) pos.push_back(j);
  bk.selected_begin = static_cast<int64_t>(pos.size());
  const int64_t width = geo.width;
  const int32_t* idx = sel.idx.data_ptr<int32_t>() + (row * geo.num_blocks + t) * width;
  const float* gate = sel.gate.data_ptr<float>() + (row * geo.num_blocks + t) * width;
  bk.selected_count = sel.count.data_ptr<int32_t>()[row * geo.num_blocks + t];
  for (int64_t s = 0; s < bk.selected_count; ++s) pos.push_back(idx[s]);
  const int64_t window_at = static_cast<int64_t>(pos.size());
  for (int64_t j = window_begin; j <= last_pos; ++j) pos.push_back(j);

  const int64_t keys = static_cast<int64_t>(pos.size());
  bk.positions = at::empty({keys}, at::kLong);
  std::copy(pos.begin(), pos.end(), bk.positions.data_ptr<int64_t>());
  bk.bias = at::zeros({bk.rows, keys}, at::kFloat);
  float* bias = bk.bias.data_ptr<float>();
  for (int64_t s = 0; s < bk.selected_count; ++s) bias[bk.selected_begin + s] = std::log(gate[s]);
  for (int64_t r = 0; r < bk.rows; ++r) {
    float* brow = bias + r * keys;
    if (r > 0) std::copy(bias, bias + window_at, brow);
    const int64_t p = first_pos + r;
    for (int64_t i = window_at; i < keys; ++i) {
      const int64_t j = pos[i];
      if (j > p || (valid != nullptr && !valid[j])) brow[i] = kNegInf;
    }
  }
  return bk;
}

// The [G, rows, D] slice of a [B, Hq, N, D] tensor for kv head `kv_head` of batch `b`.
at::Tensor group_rows(const at::Tensor& x, int64_t b, int64_t kv_head, int64_t group, int64_t first_row,
                      int64_t rows) {
  return x.select(0, b).narrow(0, kv_head * group, group).narrow(1, first_row, rows);
}

// Scaled scores plus bias, [G, rows, L], and the gathered K and V tiles.
struct BlockScores {
  at::Tensor q, k, v, s;
};

BlockScores block_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const BlockKeys& bk,
                         int64_t b, int64_t kv_head, int64_t group, double scale) {
  BlockScores out;
  out.k = k.select(0, b).select(0, kv_head).index_select(0, bk.positions).to(at::kFloat);
  out.v = v.select(0, b).select(0, kv_head).index_select(0, bk.positions).to(at::kFloat);
  out.q = group_rows(q, b, kv_head, group, bk.first_row, bk.rows).to(at::kFloat);
  out.s = at::matmul(out.q, out.k.t()).mul_(scale).add_(bk.bias);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& key_valid,
                                                     const Selection& sel, const Geometry& geo,
                                                     int64_t window, int64_t sinks, double scale) {
  const int64_t batch = q.size(0), q_heads = q.size(1), kv_heads = k.size(1);
  const int64_t group = q_heads / kv_heads;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({batch, q_heads, q.size(2)}, q.options().dtype(at::kFloat));
  const at::Tensor valid = key_valid.has_value() ? key_valid->contiguous() : at::Tensor();
  const int64_t tasks = batch * kv_heads * geo.num_blocks;

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / geo.num_blocks, t = task % geo.num_blocks;
      const int64_t b = row / kv_heads, h = row % kv_heads;
      const bool* vrow = valid.defined() ? valid.data_ptr<bool>() + b * geo.num_keys : nullptr;
      const BlockKeys bk = collect_keys(geo, sel, vrow, row, t, window, sinks);
      if (bk.positions.size(0) == 0) {  // no key at all (W = K = S = 0, or padding): zeros, lse -inf
        group_rows(out, b, h, group, bk.first_row, bk.rows).zero_();
        lse.select(0, b).narrow(0, h * group, group).narrow(1, bk.first_row, bk.rows).fill_(-INFINITY);
        continue;
      }
      const BlockScores bs = block_scores(q, k, v, bk, b, h, group, scale);
      at::Tensor m = std::get<0>(bs.s.max(-1, /*keepdim=*/true));
      m.masked_fill_(m.isinf(), 0.0);  // rows with no key: every score is -inf
      at::Tensor p = (bs.s - m).exp_();
      at::Tensor denom = p.sum(-1, /*keepdim=*/true);
      at::Tensor o = at::matmul(p, bs.v).div_(at::where(denom > 0, denom, 1.0));
      group_rows(out, b, h, group, bk.first_row, bk.rows).copy_(o);
      lse.select(0, b).narrow(0, h * group, group).narrow(1, bk.first_row, bk.rows).copy_((m + denom.log()).squeeze(-1));
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& scores,
    const c10::optional<at::Tensor>& key_valid, const Selection& sel, const Geometry& geo,
    int64_t window, int64_t sinks, double scale, bool soft, bool scores_grad) {
  const int64_t batch = q.size(0), q_heads = q.size(1), kv_heads = k.size(1);
  const int64_t num_keys = k.size(2), head_dim = k.size(3);
  const int64_t group = q_heads / kv_heads, rows_kv = batch * kv_heads;
  const bool want_dgate = scores_grad && soft && geo.width > 0;
  const at::Tensor valid = key_valid.has_value() ? key_valid->contiguous() : at::Tensor();

  // dk and dv gather contributions from many blocks. Blocks of one (batch, kv head) are split into
  // chunks that accumulate into private float buffers, summed at the end: no atomics, no locks.
  const int64_t threads = at::get_num_threads();
  const int64_t row_bytes = num_keys * head_dim * 8;
  int64_t chunks = std::min<int64_t>(std::max<int64_t>(1, geo.num_blocks), (threads + rows_kv - 1) / rows_kv);
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (int64_t(1) << 31) / std::max<int64_t>(1, row_bytes * rows_kv)));
  at::Tensor dk_part = at::zeros({chunks, batch, kv_heads, num_keys, head_dim}, q.options().dtype(at::kFloat));
  at::Tensor dv_part = at::zeros_like(dk_part);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dgate = want_dgate ? at::zeros(sel.gate.sizes(), sel.gate.options()) : at::Tensor();

  at::parallel_for(0, rows_kv * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks, chunk = task % chunks;
      const int64_t b = row / kv_heads, h = row % kv_heads;
      const bool* vrow = valid.defined() ? valid.data_ptr<bool>() + b * num_keys : nullptr;
      at::Tensor dk_acc = dk_part[chunk][b][h], dv_acc = dv_part[chunk][b][h];
      const int64_t t_begin = geo.num_blocks * chunk / chunks, t_end = geo.num_blocks * (chunk + 1) / chunks;
      for (int64_t t = t_begin; t < t_end; ++t) {
        const BlockKeys bk = collect_keys(geo, sel, vrow, row, t, window, sinks);
        if (bk.positions.size(0) == 0) continue;  // dq stays zero
        const BlockScores bs = block_scores(q, k, v, bk, b, h, group, scale);
        at::Tensor row_lse = group_rows(lse.unsqueeze(-1), b, h, group, bk.first_row, bk.rows);
        row_lse = row_lse.masked_fill(row_lse.isinf(), std::numeric_limits<float>::infinity());
        at::Tensor p = (bs.s - row_lse).exp_();  // [G, rows, L]; rows with no key give 0
        at::Tensor d_o = group_rows(dout, b, h, group, bk.first_row, bk.rows).to(at::kFloat);
        at::Tensor o = group_rows(out, b, h, group, bk.first_row, bk.rows).to(at::kFloat);
        at::Tensor delta = (d_o * o).sum(-1, /*keepdim=*/true);
        at::Tensor dp_minus_delta = at::matmul(d_o, bs.v.t()).sub_(delta);
        at::Tensor ds = p * dp_minus_delta;
        group_rows(dq, b, h, group, bk.first_row, bk.rows).copy_(at::matmul(ds, bs.k).mul_(scale));
        const int64_t gr = group * bk.rows, keys = bk.positions.size(0);
        dk_acc.index_add_(0, bk.positions, at::matmul(ds.reshape({gr, keys}).t(), bs.q.reshape({gr, head_dim})).mul_(scale));
        dv_acc.index_add_(0, bk.positions, at::matmul(p.reshape({gr, keys}).t(), d_o.reshape({gr, head_dim})));
        if (want_dgate && bk.selected_count > 0) {
          // d loss / d gate_j = sum over rows of exp(s_raw - lse) (dP - delta): the probability
          // without its gate factor, so it stays finite however small the gate.
          const auto cols = [&](const at::Tensor& x) { return x.narrow(-1, bk.selected_begin, bk.selected_count); };
          at::Tensor raw = cols(bs.s) - cols(bk.bias.unsqueeze(0));
          at::Tensor dg = ((raw - row_lse).exp_() * cols(dp_minus_delta)).sum(at::IntArrayRef{0, 1});
          dgate[b][h][t].narrow(0, 0, bk.selected_count).copy_(dg);
        }
      }
    }
  });

  at::Tensor dk = dk_part.sum(0).to(k.scalar_type());
  at::Tensor dv = dv_part.sum(0).to(v.scalar_type());
  at::Tensor dscores = want_dgate ? scores_grad_cpu(dgate, scores, key_valid, sel, geo, window, sinks)
                                  : at::zeros(scores.sizes(), scores.options());
  return {dq, dk, dv, dscores};
}

at::Tensor scores_grad_cpu(const at::Tensor& dgate, const at::Tensor& scores_in,
                           const c10::optional<at::Tensor>& key_valid, const Selection& sel,
                           const Geometry& geo, int64_t window, int64_t sinks) {
  // Gate g_j = u_j - tau for fractional members of Sel, and d tau / d u_i = 1 / |F| for i in F, so
  //   d u_i = [i in Sel and F] d g_i  -  sum over blocks with i in F of (sum_{Sel and F} d g) / |F|.
  // tau is non-decreasing over blocks, so the blocks where key i is fractional form one range,
  // found by binary search; prefix sums over blocks then give the second term in O(log T).
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor valid = key_valid.has_value() ? key_valid->contiguous() : at::Tensor();
  const at::Tensor dgate_c = dgate.contiguous();
  const int64_t heads = scores.size(1), num_keys = scores.size(2);
  const int64_t blocks = geo.num_blocks, width = geo.width;
  at::Tensor dscores = at::zeros(scores.sizes(), scores.options());
  if (blocks == 0) return dscores;
  const int64_t last_candidate = std::min(num_keys - 1, geo.block_start(blocks - 1) - window);

  at::parallel_for(0, scores.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> du(num_keys), prefix(blocks + 1);
    for (int64_t row = begin; row < end; ++row) {
      const float* u = scores.data_ptr<float>() + row * num_keys;
      const bool* vrow = valid.defined() ? valid.data_ptr<bool>() + (row / heads) * num_keys : nullptr;
      const double* tau = sel.tau.data_ptr<double>() + row * blocks;
      const int32_t* nfrac = sel.nfrac.data_ptr<int32_t>() + row * blocks;
      const int32_t* count = sel.count.data_ptr<int32_t>() + row * blocks;
      std::fill(du.begin(), du.end(), 0.0);
      for (int64_t t = 0; t < blocks; ++t) {
        const int32_t* idx = sel.idx.data_ptr<int32_t>() + (row * blocks + t) * width;
        const float* dg = dgate_c.data_ptr<float>() + (row * blocks + t) * width;
        double block_sum = 0.0;
        for (int64_t s = 0; s < count[t]; ++s) {
          if (is_fractional(u[idx[s]], tau[t])) {
            du[idx[s]] += dg[s];
            block_sum += dg[s];
          }
        }
        prefix[t + 1] = prefix[t] + (nfrac[t] > 0 ? block_sum / nfrac[t] : 0.0);
      }
      for (int64_t j = sinks; j <= last_candidate; ++j) {
        if (vrow != nullptr && !vrow[j]) continue;
        // first block of the call where j is a candidate: block_start(t) - window >= j
        const int64_t t_abs = (j + window + geo.block_q - 1) / geo.block_q;
        const int64_t t_first = std::max<int64_t>(0, t_abs - geo.first_block);
        if (t_first >= blocks) continue;
        const double uj = u[j];
        const double* lo = std::partition_point(tau + t_first, tau + blocks, [uj](double x) { return uj - x >= 1.0; });
        const double* hi = std::partition_point(tau + t_first, tau + blocks, [uj](double x) { return uj - x > 0.0; });
        if (lo < hi) du[j] -= prefix[hi - tau] - prefix[lo - tau];
      }
      float* out = dscores.data_ptr<float>() + row * num_keys;
      for (int64_t j = 0; j < num_keys; ++j) out[j] = static_cast<float>(du[j]);
    }
  });
  return dscores;
}

}  // namespace sparsek
