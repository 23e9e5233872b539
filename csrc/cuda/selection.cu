// SparseK selection on the GPU: Sel(p0), gates, tau(p0) and |F| for every query block, in parallel
// over (batch, kv head, block), with no host loop over blocks and no N^2 work.
//
// Per (batch, kv head) row of N keys, T blocks:
//   1. the eligible keys (sinks <= j <= last candidate, valid) are sorted once by (score desc,
//      position desc) through 64-bit keys: rank r. Where (row, score, position) pack into 64 bits,
//      one stable CUB radix sort of all rows over the row and score bits (each row laid out in
//      descending position); otherwise ATen sorts row by row;
//   2. key j is a candidate from block blk(j) = ceil((j + W) / block_q) on. The rank order is cut
//      into tiles of R ranks; tables cnt/sum[t][X] hold the number and the score sum of the
//      candidates of block t among ranks < X*R (a histogram over (blk, tile), then prefix sums
//      over blk and over tiles). Within each tile, the ranks are also listed by blk (by_blk, one
//      block radix sort per tile up to 4096 ranks), so the candidates of block t in a tile are a
//      prefix of that list;
//   3. one warp per block: the K-th candidate rank r_K (table search + one tile scan), tau by
//      bisection of the piecewise-linear mass sum clip(u - tau, 0, 1) (each evaluation: two
//      searches of the sorted scores + two table lookups and tile scans), then the exact root on
//      the final linear piece (as selection.cpp does); Sel = whole-tile prefixes of by_blk below
//      r_K's tile + one tile scan;
//   4. the caller takes the running max of tau over blocks and sorts each Sel by position; the
//      last kernel writes the gates and |F| with that tau (the same is_fractional test, in double).
// Cost per row: O(N log N) + O(N/R * T) table + O(T * (log^2 N + R/32 * iterations + K)).
#include <algorithm>
#include <cmath>

#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "kernels.h"

namespace sparsek_cuda {
namespace {

constexpr int64_t kNoKey = INT64_MIN;
constexpr int kWarpsPerCta = 4;

__device__ __forceinline__ uint32_t score_order(float u) {
  const uint32_t bits = u == 0.f ? 0u : __float_as_uint(u);  // -0 ties with +0, as in a comparison
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // unsigned order = score order
}

// Sort keys, two formats. Plain: (score, position) as an int64 whose descending order per row is
// the rank order (ATen sorts each row). Packed (p.packed_position_bits = b > 0): row above the
// complemented score and position, so one ascending radix sort of all rows gives every row's rank
// order in place; it sorts the row and score bits only, the position order coming from the
// layout (prepare_kernel); an ineligible key has all its low bits set (last).
__device__ __forceinline__ int64_t rank_key(const SelectParams& p, int row, float u, int j, bool ok) {
  const int b = p.packed_position_bits;
  if (b == 0) {
    if (!ok) return kNoKey;
    const uint64_t k = (static_cast<uint64_t>(score_order(u) ^ 0x80000000u) << 32) | static_cast<uint32_t>(j);
    return static_cast<int64_t>(k);
  }
  const uint64_t low_mask = (uint64_t(1) << (32 + b)) - 1;
  const uint64_t low = ok ? (static_cast<uint64_t>(~score_order(u)) << b) | (~static_cast<uint64_t>(j) & ((uint64_t(1) << b) - 1))
                          : low_mask;
  return static_cast<int64_t>((static_cast<uint64_t>(row) << (32 + b)) | low);
}

// Position of a sorted key, -1 for an ineligible one.
__device__ __forceinline__ int key_position(const SelectParams& p, int64_t key) {
  const int b = p.packed_position_bits;
  if (b == 0) return key == kNoKey ? -1 : static_cast<int>(key & 0xffffffffll);
  const uint64_t low_mask = (uint64_t(1) << (32 + b)) - 1;
  const uint64_t k = static_cast<uint64_t>(key);
  if ((k & low_mask) == low_mask) return -1;
  return static_cast<int>(~k & ((uint64_t(1) << b) - 1));
}

__device__ __forceinline__ int first_block_of(int j, const SelectParams& p) {
  const int64_t t_abs = (static_cast<int64_t>(j) + p.window + p.block_q - 1) / p.block_q;
  const int64_t t = t_abs - p.first_block;
  return static_cast<int>(t < 0 ? 0 : (t > p.num_blocks ? p.num_blocks : t));
}

__global__ void prepare_kernel(const SelectParams p, int64_t* keys, int32_t* num_eligible) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;
  if (j == 0) num_eligible[row] = 0;  // decode_kernel sets it where the row has an eligible key
  if (j >= p.num_keys) return;
  const int64_t base = static_cast<int64_t>(row) * p.num_keys;
  bool ok = j >= p.sinks && j <= p.last_candidate;
  if (ok && p.key_valid != nullptr) ok = p.key_valid[static_cast<int64_t>(row / p.kv_heads) * p.num_keys + j];
  // Packed keys go in descending position: the radix sort then orders the row and score bits only,
  // and, being stable, leaves tied scores in descending position, as the position bits would.
  const int at = p.packed_position_bits > 0 ? p.num_keys - 1 - j : j;
  keys[base + at] = rank_key(p, row, p.scores[base + j], j, ok);
}

__global__ void decode_kernel(const SelectParams p, const SelectScratch s) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;
  if (r >= p.num_keys) return;
  const int64_t base = static_cast<int64_t>(row) * p.num_keys;
  const int j = key_position(p, s.sort_keys[base + r]);
  const int X = r / p.tile, local = r - X * p.tile;
  if (j < 0) {
    s.sorted_pos[base + r] = -1;
    s.sorted_u[base + r] = -INFINITY;
    s.sorted_blk[base + r] = p.num_blocks;
    s.tile_keys[base + r] = (static_cast<int64_t>(X) << 44) | (static_cast<int64_t>(0xFFFFFF) << 20) | local;
    return;
  }
  const float u = p.scores[base + j];
  const int blk = first_block_of(j, p);
  s.sorted_pos[base + r] = j;
  s.sorted_u[base + r] = u;
  s.sorted_blk[base + r] = blk;
  s.tile_keys[base + r] = (static_cast<int64_t>(X) << 44) | (static_cast<int64_t>(blk) << 20) | local;
  if (r + 1 == p.num_keys || key_position(p, s.sort_keys[base + r + 1]) < 0) s.num_eligible[row] = r + 1;
}

__global__ void by_blk_kernel(const SelectParams p, const SelectScratch s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;
  if (i >= p.num_keys) return;
  const int64_t base = static_cast<int64_t>(row) * p.num_keys;
  const int64_t k = s.tile_keys[base + i];
  s.by_blk[base + i] = static_cast<int>(k >> 44) * p.tile + static_cast<int>(k & 0xFFFFF);
}

// Step 3 without a global sort, for tiles of up to 4096 ranks: one CTA sorts one tile's ranks by
// blk (a stable block radix sort on the blk bits only; blk >= T, never a candidate, all sort last
// as T) and writes by_blk directly. Keys pack blk above the rank's bits in the tile.
template <int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) by_blk_sort_kernel(const SelectParams p, const SelectScratch s,
                                                              int local_bits, int end_bit) {
  using Sort = cub::BlockRadixSort<uint32_t, THREADS, ITEMS>;
  __shared__ typename Sort::TempStorage tmp;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * p.num_keys;
  const int r0 = blockIdx.x * p.tile;
  uint32_t keys[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {  // blocked: the input order is the rank order, kept for ties
    const int local = threadIdx.x * ITEMS + i;
    uint32_t blk = static_cast<uint32_t>(p.num_blocks);
    if (r0 + local < p.num_keys)
      blk = min(static_cast<uint32_t>((s.tile_keys[base + r0 + local] >> 20) & 0xFFFFFF), blk);
    keys[i] = (blk << local_bits) | static_cast<uint32_t>(local);
  }
  Sort(tmp).SortBlockedToStriped(keys, local_bits, end_bit);
  const uint32_t mask = (1u << local_bits) - 1;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {  // padding ranks past N sort after every real one
    const int e = i * THREADS + threadIdx.x;
    if (r0 + e < p.num_keys) s.by_blk[base + r0 + e] = r0 + static_cast<int>(keys[i] & mask);
  }
}

// Columns X0.. of the tables, one CTA for a few tiles: for every block t, the number of a tile's
// ranks with blk <= t and the sum of their (score - shift). The tile's ranks sorted by blk
// (by_blk) make that a binary search and a prefix sum; neighbouring threads write neighbouring
// tiles of one t (coalesced). The caller then sums the columns over tiles.
constexpr int kTableThreads = 256;

__global__ void __launch_bounds__(kTableThreads) tables_kernel(const SelectParams p, const SelectScratch s,
                                                              int tiles_per_cta) {
  extern __shared__ __align__(16) unsigned char table_smem[];
  double* prefix = reinterpret_cast<double*>(table_smem);              // [tiles_per_cta][tile]
  int* blk = reinterpret_cast<int*>(prefix + tiles_per_cta * p.tile);  // [tiles_per_cta][tile]
  const int X0 = blockIdx.x * tiles_per_cta, row = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t base = static_cast<int64_t>(row) * p.num_keys;
  const double shift = s.num_eligible[row] > 0 ? static_cast<double>(s.sorted_u[base]) : 0.0;
  for (int i = threadIdx.x; i < tiles_per_cta * p.tile; i += kTableThreads) {
    const int X = X0 + i / p.tile, e = i % p.tile;
    const int64_t at = static_cast<int64_t>(X) * p.tile + e;
    if (X < p.num_tiles && at < p.num_keys) {
      const int r = s.by_blk[base + at];
      blk[i] = s.sorted_blk[base + r];
      prefix[i] = blk[i] < p.num_blocks ? static_cast<double>(s.sorted_u[base + r]) - shift : 0.0;
    } else {
      blk[i] = p.num_blocks;
      prefix[i] = 0.0;
    }
  }
  __syncthreads();
  // Inclusive prefix sums, one warp per tile, in a fixed order (the same sums every run).
  for (int x = warp; x < tiles_per_cta; x += kTableThreads / 32) {
    double carry = 0.0;
    for (int e0 = 0; e0 < p.tile; e0 += 32) {
      double v = prefix[x * p.tile + e0 + lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
      }
      prefix[x * p.tile + e0 + lane] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.num_blocks * tiles_per_cta; i += kTableThreads) {
    const int t = i / tiles_per_cta, x = i % tiles_per_cta, X = X0 + x;
    if (X >= p.num_tiles) continue;
    const int* b = blk + x * p.tile;
    int lo = 0, hi = p.tile;  // first e with blk > t
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (b[mid] <= t) lo = mid + 1; else hi = mid;
    }
    const int64_t cell = (static_cast<int64_t>(row) * p.num_blocks + t) * (p.num_tiles + 1);
    s.cnt[cell + X + 1] = lo;
    s.sum[cell + X + 1] = lo > 0 ? prefix[x * p.tile + lo - 1] : 0.0;
    if (X == 0) {
      s.cnt[cell] = 0;
      s.sum[cell] = 0.0;
    }
  }
}

// Sums over a warp, made identical on every lane (a butterfly can round differently per lane,
// and control flow depends on these values).
__device__ __forceinline__ double uniform_sum(double x) { return __shfl_sync(0xffffffffu, warp_sum(x), 0); }

// What one warp knows about one (row, block t).
struct BlockView {
  const int32_t* pos;
  const float* su;
  const int32_t* blk;
  const int32_t* by_blk;
  const int32_t* cnt;  // [tiles + 1] of block t
  const double* sum;
  int n, tile, t, lane;
  double shift;

  // The view of warp lane `lane` on (row, block t), over the rank tables of the scratch.
  static __device__ BlockView of(const SelectParams& p, const SelectScratch& s, int row, int t, int lane) {
    const int64_t base = static_cast<int64_t>(row) * p.num_keys;
    const int64_t bt = static_cast<int64_t>(row) * p.num_blocks + t;
    BlockView v;
    v.pos = s.sorted_pos + base;
    v.su = s.sorted_u + base;
    v.blk = s.sorted_blk + base;
    v.by_blk = s.by_blk + base;
    v.cnt = s.cnt + bt * (p.num_tiles + 1);
    v.sum = s.sum + bt * (p.num_tiles + 1);
    v.n = s.num_eligible[row];
    v.tile = p.tile;
    v.t = t;
    v.lane = lane;
    v.shift = v.n > 0 ? static_cast<double>(v.su[0]) : 0.0;
    return v;
  }

  // First index in [lo, hi) where pred(score) is false (pred is true then false along the ranks).
  template <class Pred>
  __device__ int partition(int lo, int hi, Pred pred) const {
    while (hi - lo > 32) {
      const int step = (hi - lo + 31) / 32;
      const int x = lo + lane * step;
      const bool pr = x < hi && pred(static_cast<double>(su[x]));
      const int k = __popc(__ballot_sync(0xffffffffu, pr));
      const int new_lo = k > 0 ? lo + (k - 1) * step + 1 : lo;
      hi = min(lo + k * step, hi);
      lo = new_lo;
    }
    const bool pr = lo + lane < hi && pred(static_cast<double>(su[lo + lane]));
    return lo + __popc(__ballot_sync(0xffffffffu, pr));
  }

  // Count and sum of (score - shift) of block t's candidates among ranks [0, e).
  __device__ void prefix(int e, int& c, double& s) const {
    const int X = e / tile;
    int cl = 0;
    double sl = 0.0;
    for (int r = X * tile + lane; r < e; r += 32) {
      if (blk[r] <= t) {
        ++cl;
        sl += static_cast<double>(su[r]) - shift;
      }
    }
    c = cnt[X] + warp_sum(cl);
    s = sum[X] + uniform_sum(sl);
  }
};

// Writes the positions of block t's candidates in the tiles [0, x_end) to out (tile by tile).
__device__ void copy_whole_tiles(const BlockView& v, int x_end, int32_t* out, int* offsets) {
  int written = 0;
  for (int x0 = 0; x0 < x_end; x0 += 32) {
    const int X = x0 + v.lane;
    const int c = X < x_end ? v.cnt[X + 1] - v.cnt[X] : 0;
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (v.lane >= o) incl += y;
    }
    offsets[v.lane] = incl - c;
    const int total = __shfl_sync(0xffffffffu, incl, 31);
    __syncwarp();
    for (int e = v.lane; e < total; e += 32) {
      int lo = 0, hi = 31;  // largest lane with offsets[lane] <= e
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= e) lo = mid; else hi = mid - 1;
      }
      const int rank = v.by_blk[static_cast<int64_t>(x0 + lo) * v.tile + (e - offsets[lo])];
      out[written + e] = v.pos[rank];
    }
    written += total;
    __syncwarp();
  }
}

__global__ void blocks_kernel(const SelectParams p, const SelectScratch s, int32_t* idx, int32_t* count,
                              int32_t* nfrac) {
  __shared__ int offsets[kWarpsPerCta][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerCta + warp;
  const int row = blockIdx.y;
  if (t >= p.num_blocks) return;
  const int64_t bt = static_cast<int64_t>(row) * p.num_blocks + t;
  const BlockView v = BlockView::of(p, s, row, t, lane);

  int32_t* out = idx + bt * p.width;
  const int ncand = v.cnt[p.num_tiles];
  const int K = p.budget;
  int sel = 0, nf = 0;  // |F| at this block's own tau (select_fix_nfrac redoes it where the running max moved tau)
  double tau = -INFINITY;
  if (ncand <= K) {
    copy_whole_tiles(v, p.num_tiles, out, offsets[warp]);
    sel = ncand;
  } else if (K == 0) {
    tau = INFINITY;
  } else {
    // Tile of the K-th candidate, then the rank r_K inside it.
    int lo = 0, hi = p.num_tiles;  // first X with cnt[X + 1] >= K
    while (hi - lo > 32) {
      const int step = (hi - lo + 31) / 32;
      const int x = lo + lane * step;
      const bool pr = x < hi && v.cnt[x + 1] < K;
      const int k = __popc(__ballot_sync(0xffffffffu, pr));
      const int new_lo = k > 0 ? lo + (k - 1) * step + 1 : lo;
      hi = min(lo + k * step, hi);
      lo = new_lo;
    }
    const int X = lo + __popc(__ballot_sync(0xffffffffu, lo + lane < hi && v.cnt[lo + lane + 1] < K));
    const int before = v.cnt[X];
    const int need = K - before;
    const int tile_end = min((X + 1) * v.tile, v.n);
    copy_whole_tiles(v, X, out, offsets[warp]);
    int found = 0, rk = -1;
    for (int r0 = X * v.tile; r0 < tile_end; r0 += 32) {
      const int r = r0 + lane;
      const bool c = r < tile_end && v.blk[r] <= t;
      const unsigned b = __ballot_sync(0xffffffffu, c);
      const int below = __popc(b & ((1u << lane) - 1u));
      if (c && found + below < need) out[before + found + below] = v.pos[r];
      const int k = __popc(b);
      if (found + k >= need) {
        const unsigned who = __ballot_sync(0xffffffffu, c && found + below + 1 == need);
        rk = r0 + __ffs(static_cast<int>(who)) - 1;
        break;
      }
      found += k;
    }
    sel = K;

    // tau: mass(tau) = sum over candidates of clip(u - tau, 0, 1); mass(lo) >= K > mass(hi).
    const double xK = static_cast<double>(v.su[rk]);
    double tlo = xK - 1.0, thi = xK;
    auto ones_pred = [](double tau_) { return [tau_](double x) { return x - tau_ >= 1.0; }; };
    auto above_pred = [](double tau_) { return [tau_](double x) { return x - tau_ > 0.0; }; };
    // Rank brackets of the two partition points over [tlo, thi] (they fall as tau rises).
    int ones_lo = v.partition(0, v.n, ones_pred(thi)), ones_hi = v.partition(0, v.n, ones_pred(tlo));
    int above_lo = v.partition(0, v.n, above_pred(thi)), above_hi = v.partition(0, v.n, above_pred(tlo));
    // Safeguarded Newton on the piecewise-linear mass: jump to the root of the current piece's
    // line; it is the answer when the piece at that point is the same piece. Otherwise bisect the
    // bracket. A flat piece (no fractional candidate) bisects towards its right end, like the CPU.
    bool solved = false;
    double guess = 0.5 * (tlo + thi);
    for (int it = 0; it < 200; ++it) {
      if (!(guess > tlo && guess < thi)) guess = 0.5 * (tlo + thi);
      if (!(guess > tlo && guess < thi)) break;
      const int oe = v.partition(ones_lo, ones_hi, ones_pred(guess));
      const int ae = v.partition(above_lo, above_hi, above_pred(guess));
      int c1, cab;
      double s1, sab;
      v.prefix(oe, c1, s1);
      v.prefix(ae, cab, sab);
      const int cf = cab - c1;
      const double mass = static_cast<double>(c1) + (sab - s1) - static_cast<double>(cf) * (guess - v.shift);
      if (mass >= static_cast<double>(K)) {
        tlo = guess;
        ones_hi = oe;
        above_hi = ae;
      } else {
        thi = guess;
        ones_lo = oe;
        above_lo = ae;
      }
      guess = 0.5 * (tlo + thi);
      if (cf > 0) {
        const double root = v.shift + (static_cast<double>(c1) + (sab - s1) - static_cast<double>(K)) / cf;
        if (root >= tlo && root <= thi) {
          if (v.partition(ones_lo, ones_hi, ones_pred(root)) == oe &&
              v.partition(above_lo, above_hi, above_pred(root)) == ae) {
            tau = root;
            nf = cf;
            solved = true;
            break;
          }
          guess = root;
        }
      }
    }
    // Bracket collapsed to adjacent doubles: the exact root on the linear piece that holds it.
    if (!solved) {
      const double mid = 0.5 * (tlo + thi);
      const int oe = v.partition(ones_lo, ones_hi, ones_pred(mid));
      const int ae = v.partition(above_lo, above_hi, above_pred(mid));
      int c1, cab;
      double s1, sab;
      v.prefix(oe, c1, s1);
      v.prefix(ae, cab, sab);
      const int cf = cab - c1;
      if (cf == 0) {
        tau = tlo;
      } else {
        tau = v.shift + (static_cast<double>(c1) + (sab - s1) - static_cast<double>(K)) / cf;
        tau = fmin(fmax(tau, tlo), thi);
      }
      const double tt = tau;
      int f1, fab;
      double g1, gab;
      v.prefix(v.partition(ones_lo, ones_hi, [tt](double x) { return x - tt >= 1.0; }), f1, g1);
      v.prefix(v.partition(above_lo, above_hi, [tt](double x) { return x - tt > 0.0; }), fab, gab);
      nf = fab - f1;
    }
  }
  // Padding sorts after every position (the caller sorts each list); finalize writes -1 there.
  for (int i = sel + lane; i < p.width; i += 32) out[i] = p.num_keys;
  if (lane == 0) {
    count[bt] = sel;
    s.raw_tau[bt] = tau;
    nfrac[bt] = nf;
  }
}

__global__ void finalize_kernel(const SelectParams p, const SelectScratch s, const double* tau_all, int32_t* idx,
                                float* gate, const int32_t* count, int32_t* nfrac) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerCta + warp;
  const int row = blockIdx.y;
  if (t >= p.num_blocks) return;
  const int64_t base = static_cast<int64_t>(row) * p.num_keys;
  const int64_t bt = static_cast<int64_t>(row) * p.num_blocks + t;
  const BlockView v = BlockView::of(p, s, row, t, lane);

  const double tau = tau_all[bt];
  const bool finite = isfinite(tau);
  int nf = 0;
  if (finite) {
    const int oe = v.partition(0, v.n, [tau](double x) { return x - tau >= 1.0; });
    const int ae = v.partition(0, v.n, [tau](double x) { return x - tau > 0.0; });
    int c1, cab;
    double s1, sab;
    v.prefix(oe, c1, s1);
    v.prefix(ae, cab, sab);
    nf = cab - c1;
  }
  const int c = count[bt];
  const float* u = p.scores + base;
  for (int i = lane; i < p.width; i += 32) {
    const int64_t at = bt * p.width + i;
    if (i < c) {
      double gv = 1.0;
      if (p.soft && finite) gv = fmin(1.0, fmax(0.0, static_cast<double>(u[idx[at]]) - tau));
      gate[at] = static_cast<float>(gv);
    } else {
      idx[at] = -1;
      gate[at] = 0.f;
    }
  }
  if (lane == 0) nfrac[bt] = nf;
}


// Each block's Sel in ascending position (CUB block radix sort over the bits a position needs;
// padding = num_keys sorts last), then its gates with the final tau and -1 / 0 past the count:
// one CTA per (row, block).
template <int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) sort_gates_kernel(const SelectParams p, const double* tau_all,
                                                            int32_t* idx, float* gate, const int32_t* count,
                                                            int end_bit) {
  using Sort = cub::BlockRadixSort<int, THREADS, ITEMS>;
  __shared__ typename Sort::TempStorage tmp;
  const int64_t bt = static_cast<int64_t>(blockIdx.y) * p.num_blocks + blockIdx.x;
  const int c = count[bt];
  const double tau = tau_all[bt];
  const bool finite = isfinite(tau);
  int32_t* list = idx + bt * p.width;
  float* g = gate + bt * p.width;
  int keys[ITEMS];
  // Striped loads and stores (element i * THREADS + thread): coalesced; the input order is free.
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int e = i * THREADS + threadIdx.x;
    keys[i] = e < c ? list[e] : p.num_keys;
  }
  if (c > 1) Sort(tmp).SortBlockedToStriped(keys, 0, end_bit);
  const float* u = p.scores + static_cast<int64_t>(blockIdx.y) * p.num_keys;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int e = i * THREADS + threadIdx.x;
    if (e >= p.width) continue;
    if (e < c) {
      double gv = 1.0;
      if (p.soft && finite) gv = fmin(1.0, fmax(0.0, static_cast<double>(u[keys[i]]) - tau));
      list[e] = keys[i];
      g[e] = static_cast<float>(gv);
    } else {
      list[e] = -1;
      g[e] = 0.f;
    }
  }
}

// The tables' prefix sums over tiles, in place: one warp per (row, block) line of len cells, in
// chunks of 32 (a shuffle scan each, carried over), cnt and sum together.
__global__ void scan_tables_kernel(int64_t lines, int len, int32_t* cnt, double* sum) {
  const int64_t line = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (line >= lines) return;
  int32_t* c = cnt + line * len;
  double* u = sum + line * len;
  int carry_c = 0;
  double carry_u = 0.0;
  for (int base = 0; base < len; base += 32) {
    const int i = base + lane;
    const int vc = warp_inclusive_scan(i < len ? c[i] : 0) + carry_c;
    const double vu = warp_inclusive_scan(i < len ? u[i] : 0.0) + carry_u;
    if (i < len) {
      c[i] = vc;
      u[i] = vu;
    }
    carry_c = __shfl_sync(0xffffffffu, vc, 31);
    carry_u = __shfl_sync(0xffffffffu, vu, 31);
  }
}

// tau[row, t] = max of raw_tau[row, 0..t]: one warp per row, each lane a contiguous run of blocks.
__global__ void running_max_kernel(const SelectParams p, const double* raw_tau, double* tau) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= p.rows) return;
  const int64_t base = static_cast<int64_t>(row) * p.num_blocks;
  const int per_lane = (p.num_blocks + 31) / 32, begin = min(lane * per_lane, p.num_blocks),
            end = min(begin + per_lane, p.num_blocks);
  double run = -INFINITY;
  for (int t = begin; t < end; ++t) run = fmax(run, raw_tau[base + t]);
  // Exclusive max-scan of the lanes' maxima, then each lane's run again from it.
  double before = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double x = __shfl_up_sync(0xffffffffu, before, o);
    if (lane >= o) before = fmax(before, x);
  }
  before = __shfl_up_sync(0xffffffffu, before, 1);
  run = lane == 0 ? -INFINITY : before;
  for (int t = begin; t < end; ++t) {
    run = fmax(run, raw_tau[base + t]);
    tau[base + t] = run;
  }
}

// |F| again for the blocks whose tau the running max raised (rounding only; rare).
__global__ void fix_nfrac_kernel(const SelectParams p, const SelectScratch s, const double* tau_all, int32_t* nfrac) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerCta + warp;
  const int row = blockIdx.y;
  if (t >= p.num_blocks) return;
  const int64_t bt = static_cast<int64_t>(row) * p.num_blocks + t;
  const double tau = tau_all[bt];
  if (tau == s.raw_tau[bt]) return;
  const BlockView v = BlockView::of(p, s, row, t, lane);
  int nf = 0;
  if (isfinite(tau)) {
    int c1, cab;
    double s1, sab;
    v.prefix(v.partition(0, v.n, [tau](double x) { return x - tau >= 1.0; }), c1, s1);
    v.prefix(v.partition(0, v.n, [tau](double x) { return x - tau > 0.0; }), cab, sab);
    nf = cab - c1;
  }
  if (lane == 0) nfrac[bt] = nf;
}

// Bits that hold every value in [0, max_value] (0 for max_value = 0): the widths of the sort keys.
int bits_for(int64_t max_value) {
  int b = 0;
  while (b < 63 && (int64_t(1) << b) <= max_value) ++b;
  return b;
}

}  // namespace

bool select_sort_gates(const SelectParams& p, const double* tau, int32_t* idx, float* gate, const int32_t* count,
                       cudaStream_t stream) {
  if (p.rows == 0 || p.num_blocks == 0) return true;
  const int end_bit = std::max(1, bits_for(p.num_keys));  // padding is num_keys
  const dim3 grid(p.num_blocks, p.rows);
  if (p.width <= 1024)
    sort_gates_kernel<128, 8><<<grid, 128, 0, stream>>>(p, tau, idx, gate, count, end_bit);
  else if (p.width <= 2048)
    sort_gates_kernel<256, 8><<<grid, 256, 0, stream>>>(p, tau, idx, gate, count, end_bit);
  else if (p.width <= 4096)
    sort_gates_kernel<512, 8><<<grid, 512, 0, stream>>>(p, tau, idx, gate, count, end_bit);
  else
    return false;
  return true;
}

void select_running_max(const SelectParams& p, const double* raw_tau, double* tau, cudaStream_t stream) {
  if (p.rows == 0 || p.num_blocks == 0) return;
  running_max_kernel<<<(p.rows + 3) / 4, 128, 0, stream>>>(p, raw_tau, tau);
}

void select_fix_nfrac(const SelectParams& p, const SelectScratch& s, const double* tau, int32_t* nfrac,
                      cudaStream_t stream) {
  if (p.rows == 0 || p.num_blocks == 0) return;
  const dim3 grid((p.num_blocks + kWarpsPerCta - 1) / kWarpsPerCta, p.rows);
  fix_nfrac_kernel<<<grid, kWarpsPerCta * 32, 0, stream>>>(p, s, tau, nfrac);
}

int packed_position_bits(int rows, int num_keys) {
  const int rb = bits_for(rows - 1), b = std::max(1, bits_for(num_keys - 1));
  if (rb + 32 + b > 64 || static_cast<int64_t>(rows) * num_keys >= (int64_t(1) << 31)) return 0;
  return b;
}

size_t select_sort_temp_bytes(const SelectParams& p) {
  size_t bytes = 0;
  const int items = p.rows * p.num_keys;
  cub::DeviceRadixSort::SortKeys(nullptr, bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
                                 items, 0, 64);
  return bytes;
}

void select_sort_packed(const SelectParams& p, void* temp, size_t temp_bytes, const int64_t* keys_in,
                        int64_t* keys_out, cudaStream_t stream) {
  // The position bits (the lowest) need no pass: select_prepare laid each row out in descending
  // position (five 8-bit passes instead of seven at 32k keys).
  const int begin_bit = p.packed_position_bits, end_bit = bits_for(p.rows - 1) + 32 + p.packed_position_bits;
  cub::DeviceRadixSort::SortKeys(temp, temp_bytes, reinterpret_cast<const uint64_t*>(keys_in),
                                 reinterpret_cast<uint64_t*>(keys_out), p.rows * p.num_keys, begin_bit, end_bit, stream);
}

void select_prepare(const SelectParams& p, const SelectScratch& s, cudaStream_t stream) {
  if (p.rows == 0 || p.num_keys == 0) return;
  prepare_kernel<<<dim3((p.num_keys + 255) / 256, p.rows), 256, 0, stream>>>(p, s.sort_keys, s.num_eligible);
}

void select_decode(const SelectParams& p, const SelectScratch& s, cudaStream_t stream) {
  if (p.rows == 0 || p.num_keys == 0) return;
  decode_kernel<<<dim3((p.num_keys + 255) / 256, p.rows), 256, 0, stream>>>(p, s);
}

void select_by_blk(const SelectParams& p, const SelectScratch& s, cudaStream_t stream) {
  if (p.rows == 0 || p.num_keys == 0) return;
  by_blk_kernel<<<dim3((p.num_keys + 255) / 256, p.rows), 256, 0, stream>>>(p, s);
}

bool select_by_blk_sorted(const SelectParams& p, const SelectScratch& s, cudaStream_t stream) {
  if (p.rows == 0 || p.num_keys == 0) return true;
  const int local_bits = bits_for(p.tile - 1), blk_bits = std::max(1, bits_for(p.num_blocks));
  if (p.tile > 4096 || local_bits + blk_bits > 32) return false;
  const dim3 grid(p.num_tiles, p.rows);
  const int end_bit = local_bits + blk_bits;
  switch (p.tile) {
    case 256: by_blk_sort_kernel<128, 2><<<grid, 128, 0, stream>>>(p, s, local_bits, end_bit); break;
    case 512: by_blk_sort_kernel<128, 4><<<grid, 128, 0, stream>>>(p, s, local_bits, end_bit); break;
    case 1024: by_blk_sort_kernel<256, 4><<<grid, 256, 0, stream>>>(p, s, local_bits, end_bit); break;
    case 2048: by_blk_sort_kernel<256, 8><<<grid, 256, 0, stream>>>(p, s, local_bits, end_bit); break;
    default: by_blk_sort_kernel<512, 8><<<grid, 512, 0, stream>>>(p, s, local_bits, end_bit); break;
  }
  return true;
}

void select_tables(const SelectParams& p, const SelectScratch& s, cudaStream_t stream) {
  if (p.rows == 0 || p.num_keys == 0 || p.num_blocks == 0) return;
  const int per_cta = p.tile >= 2048 ? 1 : std::min(8, 2048 / p.tile);
  const size_t smem = static_cast<size_t>(per_cta) * p.tile * 12;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(tables_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const dim3 grid((p.num_tiles + per_cta - 1) / per_cta, p.rows);
  tables_kernel<<<grid, kTableThreads, smem, stream>>>(p, s, per_cta);
}

void select_scan_tables(const SelectParams& p, const SelectScratch& s, cudaStream_t stream) {
  const int64_t lines = static_cast<int64_t>(p.rows) * p.num_blocks;
  if (lines == 0) return;
  scan_tables_kernel<<<static_cast<unsigned>((lines + 7) / 8), 256, 0, stream>>>(lines, p.num_tiles + 1, s.cnt, s.sum);
}

void select_blocks(const SelectParams& p, const SelectScratch& s, int32_t* idx, int32_t* count, int32_t* nfrac,
                   cudaStream_t stream) {
  if (p.rows == 0 || p.num_blocks == 0) return;
  const dim3 grid((p.num_blocks + kWarpsPerCta - 1) / kWarpsPerCta, p.rows);
  blocks_kernel<<<grid, kWarpsPerCta * 32, 0, stream>>>(p, s, idx, count, nfrac);
}

void select_finalize(const SelectParams& p, const SelectScratch& s, const double* tau, int32_t* idx,
                     float* gate, const int32_t* count, int32_t* nfrac, cudaStream_t stream) {
  if (p.rows == 0 || p.num_blocks == 0) return;
  const dim3 grid((p.num_blocks + kWarpsPerCta - 1) / kWarpsPerCta, p.rows);
  finalize_kernel<<<grid, kWarpsPerCta * 32, 0, stream>>>(p, s, tau, idx, gate, count, nfrac);
}

}  // namespace sparsek_cuda
