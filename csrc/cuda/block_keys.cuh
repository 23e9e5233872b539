// The keys one query block attends (DESIGN.md "Keys of one query block"), shared by the forward
// and backward kernels: sinks, then Sel(p0) with its gates as log-bias, then the window.
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
};

}  // namespace sparsek_cuda
