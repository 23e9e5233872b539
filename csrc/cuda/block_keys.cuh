// The keys one query block attends (DESIGN.md "Keys of one query block"), shared by the forward
// and backward kernels: sinks, then Sel(p0) with its gates as log-bias, then the window; and the
// gathers of a CTA's key tiles and query rows into shared memory.
#pragma once

#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace sparsek_cuda {

struct BlockGeo {
  int b, h, t;
  int first_pos;  // absolute position of the block's first query of this call
  int nr;         // queries of the call inside the block
  int first_r;    // their first row index
  int wb;         // first window key
  int n_sink, n_sel, L;
  int wstart;     // index of the first window key in the block's key list

  __device__ __forceinline__ void init(const AttnParams& p, int row, int t_) {
    b = row / p.kv_heads;
    h = row % p.kv_heads;
    t = t_;
    const int p0 = (p.first_block + t) * p.block_q;
    const int qstart = p.num_keys - p.num_queries;
    first_pos = max(p0, qstart);
    const int last_pos = min(p0 + p.block_q, p.num_keys) - 1;
    nr = last_pos - first_pos + 1;
    first_r = first_pos - qstart;
    wb = max(0, p0 - p.window + 1);
    n_sink = min(p.sinks, wb);
    n_sel = p.sel_count[row * p.num_blocks + t];
    wstart = n_sink + n_sel;
    L = wstart + (last_pos - wb + 1);
  }

  // Position and log2-bias of key i of the list; -1 / -inf past the end. Sinks and selected keys
  // precede the block, so only window keys are ever causally masked (in the tile loop).
  __device__ __forceinline__ void key(const AttnParams& p, int i, int& pos, float& bias2) const {
    bool valid = true;
    if (i < n_sink) {
      pos = i;
    } else if (i < wstart) {
      const int64_t at = (static_cast<int64_t>(b * p.kv_heads + h) * p.num_blocks + t) * p.width + (i - n_sink);
      pos = p.sel_idx[at];
      const float gate = p.sel_gate[at];
      bias2 = gate > 0.f ? log2f(gate) : -INFINITY;
      return;
    } else if (i < L) {
      pos = wb + (i - wstart);
    } else {
      pos = -1;
      bias2 = -INFINITY;
      return;
    }
    if (p.key_valid != nullptr) valid = p.key_valid[static_cast<int64_t>(b) * p.num_keys + pos];
    bias2 = valid ? 0.f : -INFINITY;
  }

  // Rows of a CTA are (head of the group, query) pairs flattened head-major.
  __device__ __forceinline__ int64_t q_offset(const AttnParams& p, int gr, const int64_t* stride) const {
    const int gh = gr / nr, rr = gr % nr;
    return static_cast<int64_t>(b) * stride[0] + static_cast<int64_t>(h * p.group + gh) * stride[1] +
           static_cast<int64_t>(first_r + rr) * stride[2];
  }
  // Offset of row gr in a contiguous [B, Hq, Nq] tensor (times D for [B, Hq, Nq, D]).
  __device__ __forceinline__ int64_t row_index(const AttnParams& p, int gr) const {
    const int gh = gr / nr, rr = gr % nr;
    return (static_cast<int64_t>(b) * p.q_heads + h * p.group + gh) * p.num_queries + first_r + rr;
  }
  __device__ __forceinline__ int position(int gr) const { return first_pos + gr % nr; }

  // Causal limit of row gr in list indices: key i of the list is masked for the row when
  // i > last_visible(gr) (only window keys ever are: sinks and Sel precede the block).
  __device__ __forceinline__ int last_visible(int gr) const { return position(gr) - wb + wstart; }
  // Whether a tile of the list ending before index `end` needs the causal mask at all: its last
  // key is a window key past the block's first query. (Most tiles do not.)
  __device__ __forceinline__ bool tile_needs_mask(int end) const {
    const int last_key = min(end, L) - 1;
    return last_key >= wstart && wb + (last_key - wstart) > first_pos;
  }
};

// The work of one CTA: its (batch x kv head) row, key-list split, row chunk and query block. The
// grid is one-dimensional and goes out longest first: the last query block first (the first
// blocks' key lists are the short ones) and kv heads fastest, so the last wave is short CTAs
// rather than full ones (the backward at N = 32768 is about 31 waves of 0.35 ms CTAs).
struct CtaWork {
  int row, split, chunk, t;

  __device__ __forceinline__ static CtaWork of(const AttnParams& p, int splits) {
    const unsigned rows = static_cast<unsigned>(p.batch * p.kv_heads);
    unsigned x = blockIdx.x / rows;
    CtaWork w;
    w.row = static_cast<int>(blockIdx.x % rows);
    w.split = static_cast<int>(x % splits);
    x /= splits;
    w.chunk = static_cast<int>(x % p.row_chunks);
    w.t = p.num_blocks - 1 - static_cast<int>(x / p.row_chunks);
    return w;
  }
  // The grid of that order (the host checks that it stays below 2^31 CTAs).
  static dim3 grid(const AttnParams& p, int splits) {
    return dim3(static_cast<unsigned>(work_items(p) * splits));
  }
};

// Row of the CTA in accumulator half hr (fragment rows g and g + 8) of row block rb of this thread:
// the CTA's rows are two warpgroups of RB row blocks of 64, and warp wq of a warpgroup holds rows
// [16 wq, 16 wq + 16) of each of its blocks.
template <int RB>
__device__ __forceinline__ int fragment_row(int wg, int rb, int wq, int hr, int g) {
  return (wg * RB + rb) * 64 + wq * 16 + hr * 8 + g;
}

// Causal limit (BlockGeo::last_visible) of the CTA's row lr, counted from list index first_key;
// padding rows get one that masks nothing.
constexpr int kNoCausalLimit = 0x3fffffff;
__device__ __forceinline__ int causal_limit(const BlockGeo& geo, int row_begin, int rows_here, int lr, int first_key = 0) {
  return lr < rows_here ? geo.last_visible(row_begin + lr) - first_key : kNoCausalLimit;
}

// causal_limit of each row this thread holds.
template <int RB>
__device__ __forceinline__ void causal_limits(const BlockGeo& geo, int row_begin, int rows_here, int wg, int wq, int g,
                                              int (&lim)[RB][2]) {
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) lim[rb][hr] = causal_limit(geo, row_begin, rows_here, fragment_row<RB>(wg, rb, wq, hr, g));
}

// Copies the CTA's rows [row_begin, row_begin + R) of a [B, Hq, Nq, D] tensor with the given
// strides into a tile in the sw128 layout (cp.async by the CTA's Threads threads, the caller
// commits); rows from rows_here on are zeros.
template <typename T, int D, int R, int Threads>
__device__ __forceinline__ void gather_rows(const AttnParams& p, const BlockGeo& geo, const T* src,
                                            const int64_t* stride, int row_begin, int rows_here, T* dst, int tid) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  static_assert(R * CH % Threads == 0, "whole rounds of 16-byte pieces");
#pragma unroll 4
  for (int it = 0; it < R * CH / Threads; ++it) {
    const int i = tid + it * Threads, r = i / CH, c = i % CH;
    const bool ok = r < rows_here;
    cp_async16(&dst[sw128<R>(r, c * 8)], ok ? src + geo.q_offset(p, row_begin + r, stride) + c * 8 : src, ok ? 16 : 0);
  }
}

// Gathers the K and V rows of BC keys at positions pos[0..BC) (-1: a zero row) into shared tiles
// with cp.async by the CTA's Threads threads (the caller commits); at(row, col) is the tile
// layout's element offset. kg / vg point at the (batch, kv head) rows. The trip count is a
// constant (the gather runs every tile: a runtime-bounded loop cost the backward about 100
// instructions per warp and tile); unrolled by two, as four spilled in the forward.
template <typename T, int D, int BC, int Threads, typename Layout>
__device__ __forceinline__ void gather_kv_tile(const T* kg, const T* vg, int64_t k_row_stride, int64_t v_row_stride,
                                               const int* pos, T* kd, T* vd, int tid, Layout at) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  static_assert(BC * CH % Threads == 0, "whole rounds of 16-byte pieces");
#pragma unroll 2
  for (int it = 0; it < BC * CH / Threads; ++it) {
    const int i = tid + it * Threads, kr = i / CH, c = i % CH;
    const int p = pos[kr];
    const bool ok = p >= 0;
    cp_async16(&kd[at(kr, c * 8)], ok ? kg + p * k_row_stride + c * 8 : kg, ok ? 16 : 0);
    cp_async16(&vd[at(kr, c * 8)], ok ? vg + p * v_row_stride + c * 8 : vg, ok ? 16 : 0);
  }
}

}  // namespace sparsek_cuda
