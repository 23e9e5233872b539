// Host-side entry points of the SparseK CUDA kernels: plain structs and raw pointers, no torch,
// so the .cu files build alone with nvcc. ops.cpp is the ATen wrapper around them.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace sparsek_cuda {

enum class DType { kHalf, kBFloat16 };

// One (batch, kv head) "row" of the selection; everything per row is laid out [rows, ...].
struct SelectParams {
  const float* scores;    // [rows, N]
  const bool* key_valid;  // [B, N] or null
  int rows, kv_heads, num_keys;
  int budget, window, sinks, block_q;
  int first_block, num_blocks, width;
  int last_candidate;  // highest position that is a candidate of some block of the call
  int tile;            // ranks per tile of the rank tables (power of two)
  int num_tiles;       // ceil(num_keys / tile)
  int packed_position_bits;  // > 0: sort keys packed for one radix sort of all rows (selection.cu)
  bool soft;
};

// Scratch of the selection (allocated by the caller; sizes in the comments).
struct SelectScratch {
  int64_t* sort_keys;     // [rows, N]: (score, position) key, descending sort gives the rank order
  int32_t* sorted_pos;    // [rows, N] position of rank r (-1 past the eligible keys)
  float* sorted_u;        // [rows, N] score of rank r
  int32_t* sorted_blk;    // [rows, N] first local block where rank r is a candidate (T = never)
  int64_t* tile_keys;     // [rows, N] (tile, blk, rank) keys, ascending sort groups a tile by blk
  int32_t* by_blk;        // [rows, N] ranks, each tile's ranks ordered by blk
  int32_t* num_eligible;  // [rows]
  int32_t* cnt;           // [rows, T, tiles+1]: candidates of block t among ranks < X*tile
  double* sum;            // [rows, T, tiles+1]: sum of their (score - shift)
  double* raw_tau;        // [rows, T] before the running max
};

// Bits of a position in packed sort keys, 0 when (row, score, position) do not fit 64 bits (or
// rows * N >= 2^31): then the plain keys are sorted by ATen, row by row.
int packed_position_bits(int rows, int num_keys);
// Step 1b for packed keys: one CUB radix sort of every row's keys over the used bits.
size_t select_sort_temp_bytes(const SelectParams& p);
void select_sort_packed(const SelectParams& p, void* temp, size_t temp_bytes, const int64_t* keys_in,
                        int64_t* keys_out, cudaStream_t stream);
// Step 1: sort keys. Step 2 (after the caller sorts sort_keys: packed keys with select_sort_packed,
// plain ones descending along the last dim): decode into the rank-order arrays and the tile keys.
void select_prepare(const SelectParams& p, const SelectScratch& s, cudaStream_t stream);
void select_decode(const SelectParams& p, const SelectScratch& s, cudaStream_t stream);
// Step 3 (after sorting tile_keys ascending): by_blk.
void select_by_blk(const SelectParams& p, const SelectScratch& s, cudaStream_t stream);
// Step 3 from the unsorted tile_keys, one block sort per tile (false: tiles too large, sort first).
bool select_by_blk_sorted(const SelectParams& p, const SelectScratch& s, cudaStream_t stream);
// Step 3b: per-tile columns of cnt/sum, then their prefix sums over tiles (in place).
void select_tables(const SelectParams& p, const SelectScratch& s, cudaStream_t stream);
void select_scan_tables(const SelectParams& p, const SelectScratch& s, cudaStream_t stream);
// Step 4: per block, top-K set (unsorted, padded with num_keys), count, raw tau and |F| at it.
void select_blocks(const SelectParams& p, const SelectScratch& s, int32_t* idx, int32_t* count, int32_t* nfrac,
                   cudaStream_t stream);
// Step 4b: tau = the running max of raw_tau over each row's blocks (tau only rises over blocks,
// DESIGN.md; the max absorbs rounding, as on the CPU).
void select_running_max(const SelectParams& p, const double* raw_tau, double* tau, cudaStream_t stream);
// Step 5 (after the running max of tau): |F| where the max moved tau; each Sel sorted by
// position with its gates (false when the lists are too long: the caller sorts, then finalizes).
void select_fix_nfrac(const SelectParams& p, const SelectScratch& s, const double* tau, int32_t* nfrac,
                      cudaStream_t stream);
bool select_sort_gates(const SelectParams& p, const double* tau, int32_t* idx, float* gate, const int32_t* count,
                       cudaStream_t stream);
// Fallback of step 5 (after an ascending sort of idx): gates, -1 padding, nfrac.
void select_finalize(const SelectParams& p, const SelectScratch& s, const double* tau, int32_t* idx,
                     float* gate, const int32_t* count, int32_t* nfrac, cudaStream_t stream);

struct AttnParams {
  const void* q;  // [B, Hq, Nq, D] with strides q_stride (last dim contiguous)
  const void* k;  // [B, Hkv, Nk, D]
  const void* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];
  const int32_t* sel_idx;    // [B, Hkv, T, width]
  const float* sel_gate;
  const int32_t* sel_count;  // [B, Hkv, T]
  const bool* key_valid;     // [B, Nk] or null
  int batch, q_heads, kv_heads, group, num_queries, num_keys, head_dim;
  int block_q, first_block, num_blocks, width, window, sinks;
  float scale;
  int row_blocks;  // 64-row blocks per warpgroup: 2 when a block has more than 128 rows (group *
                   // min(block_q, Nq)), else 1; a CTA takes 128 * row_blocks rows
  int row_chunks;  // CTAs per block: ceil(rows of a block / (128 * row_blocks))
};

// The attention kernels' units of work: one per (batch, kv head, query block, row chunk); a grid
// has one CTA per unit and key-list split (CtaWork).
inline int64_t work_items(const AttnParams& p) {
  return static_cast<int64_t>(p.batch) * p.kv_heads * p.num_blocks * p.row_chunks;
}

struct FwdOut {
  void* out;        // [B, Hq, Nq, D] contiguous, q's dtype
  float* lse;       // [B, Hq, Nq]
  int num_splits;   // > 1: partial results into o_part / lse_part, merged by attention_fwd
  float* o_part;    // [splits, B, Hq, Nq, D]
  float* lse_part;  // [splits, B, Hq, Nq]
};

void attention_fwd(const AttnParams& p, const FwdOut& o, DType dtype, cudaStream_t stream);

struct BwdParams {
  const void* dout;  // [B, Hq, Nq, D] contiguous
  const float* lse;  // [B, Hq, Nq]
  const float* delta;  // [B, Hq, Nq]: rowsum(dout * out)
  void* dq;          // [B, Hq, Nq, D] contiguous, q's dtype
  float* dk_acc;     // [B, Hkv, Nk, D] fp32, zeroed
  float* dv_acc;
  // The score gradient's per-block half, added by the kernel (du null: none): each selected key
  // that is fractional in its block (0 < u - tau < 1) adds its dgate to du[key] and dgate / |F| to
  // block_term[block] (scores_grad_keys subtracts those sums afterwards).
  const float* scores;   // [B, Hkv, Nk]
  const double* tau;     // [B, Hkv, T]
  const int32_t* nfrac;  // [B, Hkv, T]: |F|
  double* du;            // [B, Hkv, Nk] fp64, zeroed
  double* block_term;    // [B, Hkv, T] fp64, zeroed
};

void attention_bwd(const AttnParams& p, const BwdParams& g, DType dtype, cudaStream_t stream);

// Buffers the backward adds into, zeroed by its prologue (null / 0 bytes: unused slot). Bases
// 16-byte aligned (every ATen CUDA allocation is).
struct ZeroSpans {
  static constexpr int kMax = 3;
  void* ptr[kMax];
  int64_t bytes[kMax];
};

// Before attention_bwd, one launch: delta[row] = sum_d dout[row, d] * out[row, d] (fp32; rows of
// contiguous [.., head_dim] tensors, head_dim 64 or 128) and the zeroing of `zero`.
void bwd_prologue(const void* dout, const void* out, float* delta, int64_t rows, int head_dim, const ZeroSpans& zero,
                  DType dtype, cudaStream_t stream);
// After it: out0 / out1 (q's dtype) = acc[0 .. n) / acc[n .. 2n) (fp32), one launch for dK and dV.
void cast_pair(const float* acc, void* out0, void* out1, int64_t n, DType dtype, cudaStream_t stream);

// d scores (DESIGN.md "Score gradient"): after attention_bwd's per-block sums (BwdParams::du,
// block_term), their prefix over blocks, then per key.
// prefix[row] = [0, cumulative sums of block_term[row]] (num_blocks + 1 per row).
void scores_grad_prefix(const double* block_term, double* prefix, int rows, int num_blocks, cudaStream_t stream);
void scores_grad_keys(const SelectParams& p, const double* tau, const double* prefix, double* du, float* dscores,
                      cudaStream_t stream);

}  // namespace sparsek_cuda
