// CUDA implementations of sparsek::select / fwd / bwd: argument checks, allocation, the ATen
// steps between kernels (sorts, prefix sums) and the launches. Same schemas, output
// layouts and semantics as the CPU backend (DESIGN.md), so the fake kernels and autograd in
// sparsek_hf/_ops.py serve both.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "../sparsek.h"
#include "kernels.h"

namespace sparsek {
namespace {

using sparsek_cuda::AttnParams;
using sparsek_cuda::BwdParams;
using sparsek_cuda::DType;
using sparsek_cuda::FwdOut;
using sparsek_cuda::SelectParams;
using sparsek_cuda::SelectScratch;

using SelectionTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using FwdTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kMaxTableCells = int64_t(1) << 25;  // cnt + sum tables: 12 bytes a cell

void check_sizes(int64_t num_keys, int64_t num_blocks) {
  SPARSEK_CHECK_VALUE(num_keys < (int64_t(1) << 31) - 1, "the CUDA kernel takes fewer than 2^31 keys, got ", num_keys);
  SPARSEK_CHECK_VALUE(num_blocks < (int64_t(1) << 24), "the CUDA kernel takes fewer than 2^24 query blocks, got ",
                    num_blocks);
}

SelectParams select_params(const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid, const Geometry& geo,
                           int64_t budget, int64_t window, int64_t sinks, bool soft) {
  SelectParams p{};
  p.scores = scores.data_ptr<float>();
  p.key_valid = key_valid.has_value() ? key_valid->data_ptr<bool>() : nullptr;
  p.rows = static_cast<int>(scores.size(0) * scores.size(1));
  p.kv_heads = static_cast<int>(scores.size(1));
  p.num_keys = static_cast<int>(scores.size(2));
  p.budget = static_cast<int>(std::min<int64_t>(budget, std::numeric_limits<int>::max()));
  p.window = static_cast<int>(std::min<int64_t>(window, std::numeric_limits<int>::max() / 2));
  p.sinks = static_cast<int>(std::min<int64_t>(sinks, std::numeric_limits<int>::max()));
  p.block_q = static_cast<int>(geo.block_q);
  p.first_block = static_cast<int>(geo.first_block);
  p.num_blocks = static_cast<int>(geo.num_blocks);
  p.width = static_cast<int>(geo.width);
  p.last_candidate = geo.num_blocks > 0
                         ? static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(geo.num_keys - 1, geo.block_start(geo.num_blocks - 1) - window)))
                         : -1;
  // Ranks per tile: the smallest power of two >= 256 that keeps the tables bounded (at most 2^14,
  // the shared memory of one tile's column in tables_kernel; past that the tables grow).
  int64_t tile = 256;
  const int64_t rows = std::max<int64_t>(1, p.rows);
  while (tile < (int64_t(1) << 14) && rows * geo.num_blocks * ((p.num_keys + tile - 1) / tile + 1) > kMaxTableCells)
    tile *= 2;
  p.tile = static_cast<int>(tile);
  p.num_tiles = static_cast<int>((p.num_keys + tile - 1) / tile);
  p.soft = soft;
  return p;
}

// Byte offsets of the arrays in one scratch allocation, each on 256 bytes.
struct ScratchLayout {
  size_t bytes = 0;
  size_t take(int64_t n) {
    const size_t at = bytes;
    bytes += (static_cast<size_t>(n) + 255) / 256 * 256;
    return at;
  }
};

at::Tensor contiguous_valid(const c10::optional<at::Tensor>& key_valid) {
  return key_valid.has_value() ? key_valid->contiguous() : at::Tensor();
}

Selection select_cuda(const at::Tensor& scores_in, const c10::optional<at::Tensor>& key_valid_in, const Geometry& geo,
                      int64_t budget, int64_t window, int64_t sinks, bool soft) {
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor valid_t = contiguous_valid(key_valid_in);
  const c10::optional<at::Tensor> key_valid = valid_t.defined() ? c10::optional<at::Tensor>(valid_t) : c10::nullopt;
  const int64_t batch = scores.size(0), heads = scores.size(1), num_keys = scores.size(2);
  const int64_t blocks = geo.num_blocks, width = geo.width;
  check_sizes(num_keys, blocks);
  auto opts = scores.options();
  // Every element is written by the kernels below (the selection's host work is on the critical
  // path of a forward: no fills it does not need).
  Selection sel{
      at::empty({batch, heads, blocks, width}, opts.dtype(at::kInt)),
      at::empty({batch, heads, blocks, width}, opts.dtype(at::kFloat)),
      at::empty({batch, heads, blocks}, opts.dtype(at::kInt)),
      at::empty({batch, heads, blocks}, opts.dtype(at::kDouble)),
      at::empty({batch, heads, blocks}, opts.dtype(at::kInt)),
  };
  if (blocks == 0 || batch * heads == 0) return sel;
  if (num_keys == 0) {
    sel.idx.fill_(-1);
    sel.gate.zero_();
    sel.count.zero_();
    sel.tau.fill_(-std::numeric_limits<double>::infinity());
    sel.nfrac.zero_();
    return sel;
  }
  SelectParams p = select_params(scores, key_valid, geo, budget, window, sinks, soft);
  const int64_t rows = batch * heads;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // SPARSEK_CUDA_ROW_SORTS (set by the tests) takes the ATen row-sort path of both sorts, which is
  // otherwise only reached by shapes whose keys do not pack or whose rank tiles are too large.
  const bool row_sorts = std::getenv("SPARSEK_CUDA_ROW_SORTS") != nullptr;
  p.packed_position_bits = row_sorts ? 0 : sparsek_cuda::packed_position_bits(p.rows, p.num_keys);
  const bool packed = p.packed_position_bits > 0;
  const size_t sort_temp_bytes = packed ? sparsek_cuda::select_sort_temp_bytes(p) : 0;

  // The scratch in one allocation (a dozen at::empty calls were host time before the forward
  // kernel, which waits for them: the host issues the selection slower than the GPU runs it).
  const int64_t n = rows * num_keys, cells = rows * blocks * (p.num_tiles + 1);
  ScratchLayout lay;
  const size_t o_keys = lay.take(n * 8), o_sorted = lay.take(packed ? n * 8 : 0), o_temp = lay.take(sort_temp_bytes);
  const size_t o_pos = lay.take(n * 4), o_u = lay.take(n * 4), o_blk = lay.take(n * 4), o_tile = lay.take(n * 8);
  const size_t o_by_blk = lay.take(n * 4), o_cnt = lay.take(cells * 4), o_sum = lay.take(cells * 8);
  const size_t o_tau = lay.take(rows * blocks * 8), o_elig = lay.take(rows * 4);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(lay.bytes)}, opts.dtype(at::kByte));
  unsigned char* ws = static_cast<unsigned char*>(workspace.data_ptr());
  auto as = [&](size_t offset) { return static_cast<void*>(ws + offset); };
  SelectScratch s{};
  s.sort_keys = static_cast<int64_t*>(as(o_keys));
  s.num_eligible = static_cast<int32_t*>(as(o_elig));  // zeroed by select_prepare
  sparsek_cuda::select_prepare(p, s, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor row_sorted;  // the ATen path's sorted keys
  if (packed) {  // one radix sort over all rows and only the bits in use
    sparsek_cuda::select_sort_packed(p, as(o_temp), sort_temp_bytes, s.sort_keys, static_cast<int64_t*>(as(o_sorted)),
                                     stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    s.sort_keys = static_cast<int64_t*>(as(o_sorted));
  } else {
    const at::Tensor keys = at::from_blob(as(o_keys), {rows, num_keys}, opts.dtype(at::kLong));
    row_sorted = std::get<0>(keys.sort(-1, /*descending=*/true)).contiguous();
    s.sort_keys = row_sorted.data_ptr<int64_t>();
  }
  s.sorted_pos = static_cast<int32_t*>(as(o_pos));
  s.sorted_u = static_cast<float*>(as(o_u));
  s.sorted_blk = static_cast<int32_t*>(as(o_blk));
  s.tile_keys = static_cast<int64_t*>(as(o_tile));
  s.cnt = static_cast<int32_t*>(as(o_cnt));
  s.sum = static_cast<double*>(as(o_sum));
  sparsek_cuda::select_decode(p, s, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  s.by_blk = static_cast<int32_t*>(as(o_by_blk));
  at::Tensor tiles_sorted;
  if (row_sorts || !sparsek_cuda::select_by_blk_sorted(p, s, stream)) {  // tiles past 4096 ranks
    const at::Tensor tile_keys = at::from_blob(s.tile_keys, {rows, num_keys}, opts.dtype(at::kLong));
    tiles_sorted = std::get<0>(tile_keys.sort(-1, /*descending=*/false)).contiguous();
    s.tile_keys = tiles_sorted.data_ptr<int64_t>();
    sparsek_cuda::select_by_blk(p, s, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sparsek_cuda::select_tables(p, s, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sparsek_cuda::select_scan_tables(p, s, stream);  // over tiles: candidates among ranks < X * tile
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  s.raw_tau = static_cast<double*>(as(o_tau));
  sparsek_cuda::select_blocks(p, s, sel.idx.data_ptr<int32_t>(), sel.count.data_ptr<int32_t>(),
                              sel.nfrac.data_ptr<int32_t>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  sparsek_cuda::select_running_max(p, s.raw_tau, sel.tau.data_ptr<double>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sparsek_cuda::select_sort_gates(p, sel.tau.data_ptr<double>(), sel.idx.data_ptr<int32_t>(),
                                      sel.gate.data_ptr<float>(), sel.count.data_ptr<int32_t>(), stream)) {
    sparsek_cuda::select_fix_nfrac(p, s, sel.tau.data_ptr<double>(), sel.nfrac.data_ptr<int32_t>(), stream);
  } else {
    sel.idx = std::get<0>(sel.idx.sort(-1)).contiguous();
    sparsek_cuda::select_finalize(p, s, sel.tau.data_ptr<double>(), sel.idx.data_ptr<int32_t>(),
                                  sel.gate.data_ptr<float>(), sel.count.data_ptr<int32_t>(),
                                  sel.nfrac.data_ptr<int32_t>(), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sel;
}

// cp.async moves 16-byte pieces: rows must start on 16 bytes.
at::Tensor aligned(const at::Tensor& t) {
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                  t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 && t.stride(3) == 1;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_cuda_inputs(const at::Tensor& q) {
  SPARSEK_CHECK_VALUE(q.size(3) == 64 || q.size(3) == 128, "the CUDA kernel takes head dim 64 or 128, got ", q.size(3),
                      " (sparsek_attention falls back to the reference for other head dims)");
}

AttnParams attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& key_valid, const Selection& sel, const Geometry& geo,
                       int64_t window, int64_t sinks, double scale) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k.stride(d);
    p.v_stride[d] = v.stride(d);
  }
  p.sel_idx = sel.idx.data_ptr<int32_t>();
  p.sel_gate = sel.gate.data_ptr<float>();
  p.sel_count = sel.count.data_ptr<int32_t>();
  p.key_valid = key_valid.has_value() ? key_valid->data_ptr<bool>() : nullptr;
  p.batch = static_cast<int>(q.size(0));
  p.q_heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.group = p.q_heads / p.kv_heads;
  p.num_queries = static_cast<int>(q.size(2));
  p.num_keys = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.block_q = static_cast<int>(geo.block_q);
  p.first_block = static_cast<int>(geo.first_block);
  p.num_blocks = static_cast<int>(geo.num_blocks);
  p.width = static_cast<int>(geo.width);
  p.window = static_cast<int>(std::min<int64_t>(window, std::numeric_limits<int>::max() / 2));
  p.sinks = static_cast<int>(std::min<int64_t>(sinks, std::numeric_limits<int>::max()));
  p.scale = static_cast<float>(scale);
  // The whole GQA group of a block in one CTA when it has more than 128 rows: each gathered tile is
  // read, and each key's dK / dV added, once per block (not twice).
  const int64_t block_rows = p.group * std::min<int64_t>(geo.block_q, geo.num_queries);
  p.row_blocks = block_rows > 128 ? 2 : 1;
  p.row_chunks = static_cast<int>((block_rows + 128 * p.row_blocks - 1) / (128 * p.row_blocks));
  // One-dimensional grids (CtaWork), split up to 64 ways for decode.
  const int64_t ctas = sparsek_cuda::work_items(p);
  SPARSEK_CHECK_VALUE(ctas * 64 < (int64_t(1) << 31), "the CUDA kernels take fewer than 2^25 (batch x kv head x query ",
                      "block) work items, got ", ctas);
  return p;
}

DType dtype_of(const at::Tensor& q) { return q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kHalf; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in,
                                                      const c10::optional<at::Tensor>& key_valid,
                                                      const Selection& sel, const Geometry& geo, int64_t window,
                                                      int64_t sinks, double scale) {
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AttnParams p = attn_params(q, k, v, key_valid, sel, geo, window, sinks, scale);
  // Decode and short chunks give few CTAs: split each block's key list across CTAs (merged by lse).
  const int64_t ctas = sparsek_cuda::work_items(p);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int64_t most_tiles = (std::min<int64_t>(sinks, geo.num_keys) + geo.width + window + geo.block_q + 63) / 64;
  int64_t splits = 1;
  if (ctas < sms && most_tiles >= 2) splits = std::min<int64_t>({most_tiles, (2 * sms + ctas - 1) / ctas, 64});
  FwdOut o{};
  o.out = out.data_ptr();
  o.lse = lse.data_ptr<float>();
  o.num_splits = static_cast<int>(splits);
  at::Tensor o_part, lse_part;
  if (splits > 1) {
    o_part = at::empty({splits, q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
    lse_part = at::empty({splits, q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    o.o_part = o_part.data_ptr<float>();
    o.lse_part = lse_part.data_ptr<float>();
  }
  sparsek_cuda::attention_fwd(p, o, dtype_of(q), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

SelectionTuple select_cuda_op(const at::Tensor& scores, const c10::optional<at::Tensor>& key_valid,
                              int64_t num_queries, int64_t budget, int64_t window, int64_t sinks, int64_t block_q,
                              bool soft) {
  check_selection_args(scores, key_valid, num_queries, budget, window, sinks, block_q);
  const c10::cuda::CUDAGuard guard(scores.device());
  const Geometry geo = make_geometry(num_queries, scores.size(2), budget, window, sinks, block_q);
  Selection s = select_cuda(scores, key_valid, geo, budget, window, sinks, soft);
  return {s.idx, s.gate, s.count, s.tau, s.nfrac};
}

FwdTuple fwd_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& scores,
                     const c10::optional<at::Tensor>& key_valid, int64_t budget, int64_t window, int64_t sinks,
                     int64_t block_q, double scale, bool soft) {
  check_attention_args(q, k, v, scores, key_valid, budget, window, sinks, block_q);
  check_cuda_inputs(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const Geometry geo = make_geometry(q.size(2), k.size(2), budget, window, sinks, block_q);
  const at::Tensor valid_t = contiguous_valid(key_valid);
  const c10::optional<at::Tensor> valid = valid_t.defined() ? c10::optional<at::Tensor>(valid_t) : c10::nullopt;
  Selection s = select_cuda(scores, valid, geo, budget, window, sinks, soft);
  auto [out, lse] = attention_fwd_cuda(q, k, v, valid, s, geo, window, sinks, scale);
  return {out, lse, s.idx, s.gate, s.count, s.tau, s.nfrac};
}

BwdTuple bwd_cuda_op(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                     const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& scores_in,
                     const c10::optional<at::Tensor>& key_valid, const at::Tensor& sel_idx,
                     const at::Tensor& sel_gate, const at::Tensor& sel_count, const at::Tensor& tau,
                     const at::Tensor& nfrac, int64_t window, int64_t sinks, int64_t block_q, double scale, bool soft,
                     bool scores_grad) {
  SPARSEK_CHECK_VALUE(dout_in.sizes() == q_in.sizes(), "dout must have the shape of q ", q_in.sizes(), ", got ",
                    dout_in.sizes());
  check_cuda_inputs(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Geometry geo = make_geometry(q_in.size(2), k_in.size(2), sel_idx.size(3), window, sinks, block_q);
  SPARSEK_CHECK_VALUE(geo.width == sel_idx.size(3) && geo.num_blocks == sel_idx.size(2),
                    "the selection does not belong to these inputs");
  const Selection s{sel_idx.contiguous(), sel_gate.contiguous(), sel_count.contiguous(), tau.contiguous(),
                    nfrac.contiguous()};
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor valid_t = contiguous_valid(key_valid);
  const c10::optional<at::Tensor> valid = valid_t.defined() ? c10::optional<at::Tensor>(valid_t) : c10::nullopt;
  const bool want_dgate = scores_grad && soft && geo.width > 0;

  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  // dK and dV accumulate in one fp32 buffer [2, B, Hkv, Nk, D], zeroed with delta's computation in
  // one prologue launch and cast to q's dtype in one launch at the end.
  std::vector<int64_t> acc_sizes{2};
  acc_sizes.insert(acc_sizes.end(), k.sizes().begin(), k.sizes().end());
  const at::Tensor kv_acc = at::empty(acc_sizes, k.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 || geo.num_blocks == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, at::zeros(scores.sizes(), scores.options())};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t rows = scores.size(0) * scores.size(1);
  // With the score gradient, scores_grad_keys writes every element of dscores; the backward kernel
  // adds into du and block_term, so the prologue zeroes those two.
  at::Tensor block_term =
      want_dgate ? at::empty({rows, geo.num_blocks}, scores.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor du = want_dgate ? at::empty({rows, scores.size(2)}, scores.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor dscores = want_dgate ? at::empty(scores.sizes(), scores.options()) : at::zeros(scores.sizes(), scores.options());
  const at::Tensor out_c = out.to(q.scalar_type()).contiguous();
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  sparsek_cuda::ZeroSpans zero{};
  zero.ptr[0] = kv_acc.data_ptr();
  zero.bytes[0] = kv_acc.numel() * 4;
  if (want_dgate) {
    zero.ptr[1] = block_term.data_ptr();
    zero.bytes[1] = block_term.numel() * 8;
    zero.ptr[2] = du.data_ptr();
    zero.bytes[2] = du.numel() * 8;
  }
  sparsek_cuda::bwd_prologue(dout.data_ptr(), out_c.data_ptr(), delta.data_ptr<float>(), delta.numel(), q.size(3), zero,
                             dtype_of(q), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor lse_c = lse.contiguous();
  AttnParams p = attn_params(q, k, v, valid, s, geo, window, sinks, scale);
  BwdParams g{};
  g.dout = dout.data_ptr();
  g.lse = lse_c.data_ptr<float>();
  g.delta = delta.data_ptr<float>();
  g.dq = dq.data_ptr();
  g.dk_acc = kv_acc.select(0, 0).data_ptr<float>();
  g.dv_acc = kv_acc.select(0, 1).data_ptr<float>();
  if (want_dgate) {
    g.scores = scores.data_ptr<float>();
    g.tau = s.tau.data_ptr<double>();
    g.nfrac = s.nfrac.data_ptr<int32_t>();
    g.du = du.data_ptr<double>();
    g.block_term = block_term.data_ptr<double>();
  }
  sparsek_cuda::attention_bwd(p, g, dtype_of(q), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (want_dgate) {
    const SelectParams sp = select_params(scores, valid, geo, sel_idx.size(3), window, sinks, soft);
    const at::Tensor prefix = at::empty({rows, geo.num_blocks + 1}, block_term.options());
    sparsek_cuda::scores_grad_prefix(block_term.data_ptr<double>(), prefix.data_ptr<double>(), static_cast<int>(rows),
                                     static_cast<int>(geo.num_blocks), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sparsek_cuda::scores_grad_keys(sp, s.tau.data_ptr<double>(), prefix.data_ptr<double>(), du.data_ptr<double>(),
                                   dscores.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sparsek_cuda::cast_pair(kv_acc.data_ptr<float>(), dk.data_ptr(), dv.data_ptr(), k.numel(), dtype_of(q), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dscores};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsek, CUDA, m) {
  m.impl("select", &select_cuda_op);
  m.impl("fwd", &fwd_cuda_op);
  m.impl("bwd", &bwd_cuda_op);
}

}  // namespace sparsek
