// SparseK attention backward on Hopper tensor cores (wgmma, fp32 accumulate).
//
// One CTA = one (batch, kv head, query block) and up to 128 * RB query rows of the GQA group: two
// warpgroups of RB row blocks of 64 rows. RB = 2 when the block has more than 128 rows (the group
// of four heads of the benchmark): dK / dV are then added once per block instead of twice, and
// those adds bound the kernel. For each gathered tile of 64 keys, each warpgroup, per row block:
//   S = Q K^T, dP = dO V^T                      wgmma m64n64, Q / dO / K / V in shared memory
//   P = exp2(S*scale*log2e - lse2) * gate,  dS = P_raw (dP - delta) * gate       (registers)
//   dgate[key] = sum over rows of P_raw (dP - delta)          (selected keys only, see below)
//   dQ += dS K                                  wgmma m64nD, dS from registers (one write at the end)
// then, over all rows of the CTA (P and dS staged in shared memory, one barrier):
//   warpgroup 0: dV = P^T dO, warpgroup 1: dK = dS^T Q        wgmma m64nD (the tile's 64 keys)
// and the products go to the global fp32 dk / dv buffers as 16-byte reductions (a key is shared
// by many query blocks), staged through the warpgroup's P or dS buffer.
// The products run at shared-memory speed, so the tile is as wide as registers and shared memory
// allow: 64 keys read Q / dO once per 64 keys (32-key tiles read them twice as often). dQ of RB
// row blocks holds 128 of the 255 registers; shared memory is full at D = 128, RB = 2, which is
// why K / V have one buffer (the next tile's gather goes out once dQ has read this one, and lands
// under dV / dK and the reductions), the key list comes two tiles ahead through registers rather
// than from a metadata array, and lse / delta are read straight into registers.
// Q, dO, K, V, P and dS are panels of rows x 64 elements with wgmma's 128-byte swizzle.
// d scores as scores_grad_cpu: each fractional key's dgate goes straight to du and, over |F|, to
// its block's term as fp64 reductions from the tile loop (a separate pass over the selection
// spent 88 us at N = 32768 on those adds); scores_grad_keys (below) subtracts the terms per key.
#include <algorithm>
#include <type_traits>

#include "block_keys.cuh"
#include "wgmma.cuh"

namespace sparsek_cuda {
namespace {

constexpr int kThreads = 256;  // two warpgroups
constexpr int kTK = 64;         // keys per tile
constexpr int kNarrowTK = 16;   // a last tile of at most this many keys runs narrower products

// P and dS buffers (elements): each also stages one warpgroup's fp32 dV / dK tile for the
// vector reductions.
template <int D, int RB>
constexpr int ps_elems() { return 128 * RB * kTK > kTK * D * 2 ? 128 * RB * kTK : kTK * D * 2; }

template <int D, int RB>
constexpr size_t bwd_smem_bytes() {
  constexpr int R = 128 * RB;
  // Q, dO [R][D]; K, V [kTK][D] (one buffer each); P, dS; per-stage gate and position; dgate
  // column sums (one row per warpgroup); 1024 bytes to align the base. At D = 128, RB = 2 that
  // is 231936 of the 232448 bytes a CTA may have.
  return static_cast<size_t>(2 * R * D + 2 * kTK * D + 2 * ps_elems<D, RB>()) * 2 + 2 * kTK * 8 + 2 * kTK * 4 +
         kSmemAlignSlack;
}

__device__ __forceinline__ void red_add_v4(float* dst, float4 a) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a.x), "f"(a.y), "f"(a.z), "f"(a.w)
               : "memory");
}

// Sums over the warp's 8 row groups (lanes xor 4, 8, 16) of the 2J column values col[j][e] of
// each lane (column 8j + 2 (lane % 4) + e). J = 8 by halving exchanges (14 shuffles): lane
// 4g + c4 ends with the columns 8g + 2 c4 + {0, 1} in v. Narrower tiles (J < 8) reduce every
// value on all lanes, and lanes g < J keep those of columns 8g + 2 c4 + {0, 1}.
template <int J>
__device__ __forceinline__ void column_sums(const float (&col)[J][2], int g, float (&v)[2]) {
  if constexpr (J == 8) {
    float a[8], b[4];
    const bool h2 = g & 4, h1 = g & 2, h0 = g & 1;
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // keep values 8 h2 + i
      const float lo = col[i >> 1][i & 1], hi = col[4 + (i >> 1)][i & 1];
      a[i] = (h2 ? hi : lo) + __shfl_xor_sync(0xffffffffu, h2 ? lo : hi, 16);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) b[i] = (h1 ? a[4 + i] : a[i]) + __shfl_xor_sync(0xffffffffu, h1 ? a[i] : a[4 + i], 8);
#pragma unroll
    for (int i = 0; i < 2; ++i) v[i] = (h0 ? b[2 + i] : b[i]) + __shfl_xor_sync(0xffffffffu, h0 ? b[i] : b[2 + i], 4);
  } else {
    float t[J][2];
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        t[j][e] = col[j][e];
#pragma unroll
        for (int o = 16; o >= 4; o >>= 1) t[j][e] += __shfl_xor_sync(0xffffffffu, t[j][e], o);
      }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      v[e] = t[0][e];
#pragma unroll
      for (int j = 1; j < J; ++j) v[e] = g == j ? t[j][e] : v[e];
    }
  }
}

// Whether a selected key of score u is fractional in a block of threshold tau (its gate strictly
// between 0 and 1), where the score gradient flows.
__device__ __forceinline__ bool is_fractional(double u, double tau) {
  const double excess = u - tau;
  return excess > 0.0 && excess < 1.0;
}

__device__ __forceinline__ void red_add_f64(double* dst, double a) {
  asm volatile("red.global.add.f64 [%0], %1;\n" ::"l"(dst), "d"(a) : "memory");
}

template <typename T, int D, int RB>
__global__ void __launch_bounds__(kThreads, 1) bwd_kernel(const AttnParams p, const BwdParams gp) {
  constexpr int R = 128 * RB;  // rows of the CTA
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = smem_raw + smem_align_offset(smem_raw);
  T* Qs = reinterpret_cast<T*>(base);
  T* dOs = Qs + R * D;
  T* Ks = dOs + R * D;
  T* Vs = Ks + kTK * D;
  T* Ps = Vs + kTK * D;
  T* dSs = Ps + ps_elems<D, RB>();
  float* tile_gate = reinterpret_cast<float*>(dSs + ps_elems<D, RB>());  // [2][kTK] gate (0: masked)
  int* tile_pos = reinterpret_cast<int*>(tile_gate + 2 * kTK);           // [2][kTK]
  float* tile_dg = reinterpret_cast<float*>(tile_pos + 2 * kTK);         // [2][kTK] dgate sums per warpgroup

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warpgroup_index(), wq = warp & 3;  // warpgroup, warp within it
  const CtaWork work = CtaWork::of(p, 1);
  const int row = work.row, chunk = work.chunk, t = work.t;

  BlockGeo geo;
  geo.init(p, row, t);
  const int rows_total = p.group * geo.nr;
  const int row_begin = chunk * R;
  if (row_begin >= rows_total) return;
  const int rows_here = min(R, rows_total - row_begin);
  const int tiles = (geo.L + kTK - 1) / kTK;

  const T* qg = static_cast<const T*>(p.q);
  const T* dog = static_cast<const T*>(gp.dout);
  const T* kg = static_cast<const T*>(p.k) + geo.b * p.k_stride[0] + geo.h * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + geo.b * p.v_stride[0] + geo.h * p.v_stride[1];
  const int64_t dout_stride[3] = {static_cast<int64_t>(p.q_heads) * p.num_queries * D,
                                  static_cast<int64_t>(p.num_queries) * D, D};

  gather_rows<T, D, R, kThreads>(p, geo, qg, p.q_stride, row_begin, rows_here, Qs, tid);
  gather_rows<T, D, R, kThreads>(p, geo, dog, dout_stride, row_begin, rows_here, dOs, tid);

  // Key i of the list: position and gate (0 for masked keys and past the end; exp2 of the forward's
  // log2-bias, so a key the forward masked is masked here). Threads tid < kTK fetch a tile's keys
  // into registers two tiles ahead (under dV / dK and the reductions, so the loads' latency is
  // hidden) and park them in the tile's stage at the top of the tile before.
  int next_pos = -1;
  float next_gate = 0.f;
  auto fetch_key = [&](int n) {
    if (tid < kTK) {
      float b2;
      geo.key(p, n * kTK + tid, next_pos, b2);
      next_gate = exp2f(b2);
    }
  };
  auto park_key = [&](int st) {
    if (tid < kTK) {
      tile_gate[st * kTK + tid] = next_gate;
      tile_pos[st * kTK + tid] = next_gate == 0.f ? -1 : next_pos;
    }
  };
  auto issue_tile = [&](int st) {
    gather_kv_tile<T, D, kTK, kThreads>(kg, vg, p.k_stride[2], p.v_stride[2], tile_pos + st * kTK, Ks, Vs, tid,
                                        [](int r, int c) { return sw128<kTK>(r, c); });
  };

  if (tid < 2 * kTK) tile_dg[tid] = 0.f;
  if (tiles > 0) {
    fetch_key(0);
    park_key(0);
    __syncthreads();
    issue_tile(0);
    if (tiles > 1) fetch_key(1);
  }
  cp_async_commit();

  const float scale2 = p.scale * kLog2e;
  const int g = lane >> 2, c4 = lane & 3;
  const bool want_dgate = gp.du != nullptr;
  // lse and delta of this thread's rows, straight into registers (padding rows: P = 0).
  float lse_r[RB][2], delta_r[RB][2];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int lr = fragment_row<RB>(wg, rb, wq, hr, g);
      float lse2 = INFINITY, delta = 0.f;
      if (lr < rows_here) {
        const int64_t ri = geo.row_index(p, row_begin + lr);
        const float lse = gp.lse[ri];
        if (lse != -INFINITY) lse2 = lse * kLog2e;
        delta = gp.delta[ri];
      }
      lse_r[rb][hr] = lse2;
      delta_r[rb][hr] = delta;
    }

  const uint32_t q_addr = smem_addr(Qs), do_addr = smem_addr(dOs), kt = smem_addr(Ks), vt = smem_addr(Vs);
  const uint32_t p_addr = smem_addr(Ps), ds_addr = smem_addr(dSs);
  constexpr uint32_t kRowPanel = R * 128, kKeyPanel = kTK * 128;  // bytes of one 64-column panel

  float dq[RB][D / 2];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[rb][i] = 0.f;

  double frac_sum = 0.0;  // threads tid < kTK: their keys' dgate over the fractional ones
  for (int n = 0; n < tiles; ++n) {
    const int st = n & 1;
    cp_async_wait_all();
    fence_async_shared();  // cp.async wrote the tile through the generic proxy; wgmma reads async
    __syncthreads();
    if (n + 1 < tiles) park_key(st ^ 1);  // read after the barrier below
    const float* gate = tile_gate + st * kTK;
    const bool need_mask = geo.tile_needs_mask((n + 1) * kTK);
    const bool tile_has_sel = want_dgate && n * kTK < geo.wstart && (n + 1) * kTK > geo.n_sink;

    // A tile of at most 16 keys (the last one of most blocks: the benchmark's 4 + 2048 + 575 keys
    // leave 3) runs S, dP and dQ at n16 / k16, a quarter of their work. dV / dK stay m64 (the keys
    // are their rows): the rows past the tile's keys read stale P / dS columns, and their positions
    // are -1, so they are never added.
    auto row_blocks = [&](auto width) {
      constexpr int TK = decltype(width)::value;
      float dg[2];  // this lane's two dgate column sums of the tile
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
        const int row0 = (wg * RB + rb) * 64;  // first row of this row block
        const int wrow = row0 + wq * 16;       // first row of this warp
        float s[TK / 2], dp[TK / 2];
        wgmma_fence();
        wgmma_rows_by_rows<T, TK, D>(s, q_addr + row0 * 128, kRowPanel, kt, kKeyPanel);
        wgmma_commit();
        wgmma_rows_by_rows<T, TK, D>(dp, do_addr + row0 * 128, kRowPanel, vt, kKeyPanel);
        wgmma_commit();
        wgmma_wait<1>();
        wgmma_pin(s);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const float lse2 = lse_r[rb][hr];
          int limit = kNoCausalLimit;  // the row's causal limit in tile columns (few tiles need one)
          if (need_mask) limit = causal_limit(geo, row_begin, rows_here, fragment_row<RB>(wg, rb, wq, hr, g), n * kTK);
#pragma unroll
          for (int j = 0; j < TK / 8; ++j) {
            const float2 gg = *reinterpret_cast<const float2*>(&gate[j * 8 + 2 * c4]);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int kc = j * 8 + 2 * c4 + e;
              const bool masked = (e ? gg.y : gg.x) == 0.f || (need_mask && kc > limit);
              s[4 * j + 2 * hr + e] = masked ? 0.f : exp2f(s[4 * j + 2 * hr + e] * scale2 - lse2);
            }
          }
        }
        wgmma_wait<0>();
        wgmma_pin(dp);
        float col[TK / 8][2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int lr = wrow + hr * 8 + g;
          const float delta = delta_r[rb][hr];
#pragma unroll
          for (int j = 0; j < TK / 8; ++j) {
            const float2 gg = *reinterpret_cast<const float2*>(&gate[j * 8 + 2 * c4]);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float gt = e ? gg.y : gg.x;
              const float praw = s[4 * j + 2 * hr + e];
              const float dsraw = praw * (dp[4 * j + 2 * hr + e] - delta);
              col[j][e] = hr ? col[j][e] + dsraw : dsraw;
              s[4 * j + 2 * hr + e] = praw * gt;
              dp[4 * j + 2 * hr + e] = dsraw * gt;
            }
            *reinterpret_cast<uint32_t*>(&Ps[sw128<R>(lr, j * 8 + 2 * c4)]) = Mma<T>::pack(s[4 * j + 2 * hr], s[4 * j + 2 * hr + 1]);
            *reinterpret_cast<uint32_t*>(&dSs[sw128<R>(lr, j * 8 + 2 * c4)]) =
                Mma<T>::pack(dp[4 * j + 2 * hr], dp[4 * j + 2 * hr + 1]);
          }
        }
        // dQ += dS K: dS from registers, K read MN-major.
        wgmma_fragments_by_tile<T, D, TK>(dq[rb], dp, kt, kKeyPanel);
        wgmma_commit();
        if (tile_has_sel) {  // this row block's column sums of the warp, summed over the row blocks
          float v[2];
          column_sums(col, g, v);
          dg[0] = rb ? dg[0] + v[0] : v[0];
          dg[1] = rb ? dg[1] + v[1] : v[1];
        }
      }
      // The warp's column sums, added in shared memory once per tile into its warpgroup's row: a float
      // add there is a compare-and-swap loop on sm_90 and retries while other warps hit the same
      // word, so each word sees four adds, not sixteen (ncu: these loops were 5% of the samples).
      if (tile_has_sel && g < TK / 8) {  // (lanes past a narrow tile's columns hold none)
        atomicAdd(&tile_dg[wg * kTK + g * 8 + 2 * c4], dg[0]);
        atomicAdd(&tile_dg[wg * kTK + g * 8 + 2 * c4 + 1], dg[1]);
      }
    };
    if (geo.L - n * kTK <= kNarrowTK)
      row_blocks(std::integral_constant<int, kNarrowTK>{});
    else
      row_blocks(std::integral_constant<int, kTK>{});
    wgmma_wait<0>();  // dQ has read K: the buffer is free once every warp is past the barrier
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) wgmma_pin(dq[rb]);
    fence_async_shared();
    __syncthreads();  // P and dS of every row staged; K / V free; the next tile's keys parked
    if (n + 1 < tiles) issue_tile(st ^ 1);
    cp_async_commit();

    // Warpgroup 0: dV = P^T dO; warpgroup 1: dK = dS^T Q: m64 (the tile's keys) x nD, k over the
    // CTA's rows. Both operands read MN-major (a k-step of 16 rows is two 8-row groups of 1024
    // bytes); the n = D product reads P / dS once for all head dims.
    float acc[D / 2];
    {
      const uint32_t a_addr = wg == 0 ? p_addr : ds_addr, b_addr = wg == 0 ? do_addr : q_addr;
      const uint64_t a = wgmma_desc(a_addr, kRowPanel, 1024), b = wgmma_desc(b_addr, kRowPanel, 1024);
      wgmma_fence();
#pragma unroll
      for (int kr = 0; kr < R / 16; ++kr)
        Wgmma<T, D>::template ss<1, 1>(acc, wgmma_desc_add(a, kr * 2048), wgmma_desc_add(b, kr * 2048), kr);
      wgmma_commit();
    }
    const int* tpos = tile_pos + st * kTK;
    if (tile_has_sel && tid < kTK) {  // the score gradient's per-block half (scores_grad_keys does the rest)
      const int key = n * kTK + tid, pos = tpos[tid];
      const float v = tile_dg[tid] + tile_dg[kTK + tid];  // dgate of key
      tile_dg[tid] = tile_dg[kTK + tid] = 0.f;
      const int64_t at = static_cast<int64_t>(row) * p.num_keys + pos;
      // (tau re-read per tile, an L1 hit: held across the loop it would cost two registers)
      const int block_at = row * p.num_blocks + t;  // (below 2^31, as the grid is)
      if (key >= geo.n_sink && key < geo.wstart && pos >= 0 && is_fractional(gp.scores[at], gp.tau[block_at])) {
        red_add_f64(&gp.du[at], v);  // keys are shared by blocks; fp64, as the CPU kernel sums
        frac_sum += v;
      }
    }
    if (n + 2 < tiles) fetch_key(n + 2);
    wgmma_wait<0>();
    wgmma_pin(acc);
    // dK / dV leave the SM as fp32 reductions at L2 (a key is shared by many query blocks).
    // acc[4j + 2hr + e] is key wq*16 + g + 8hr, head dim 8j + 2*c4 + e.
    float* dst = (wg == 0 ? gp.dv_acc : gp.dk_acc) + (static_cast<int64_t>(geo.b) * p.kv_heads + geo.h) * p.num_keys * D;
    const float mul = wg == 0 ? 1.f : p.scale;
    // Staged through this warpgroup's own buffer (P for dV, dS for dK: the product that read it is
    // complete) so that each warp's reduction carries whole key rows (16 bytes a lane; straight from
    // the fragments, 32 bytes of 16 rows, it measured 4% slower). The 16-byte chunk of key k's row
    // is xor-ed by 2 * (k % 4): a warp's 8-byte stores (8 keys x 32 bytes) take the two wavefronts
    // that 256 bytes need.
    float* stage = reinterpret_cast<float*>(wg == 0 ? Ps : dSs);
    auto at = [](int key, int d) { return key * D + ((((d >> 2) ^ ((key & 3) << 1))) << 2) + (d & 3); };
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        *reinterpret_cast<float2*>(&stage[at(wq * 16 + g + 8 * hr, 8 * j + 2 * c4)]) =
            make_float2(acc[4 * j + 2 * hr] * mul, acc[4 * j + 2 * hr + 1] * mul);
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");  // this warpgroup only
    const int tw = tid & 127;
#pragma unroll
    for (int i = 0; i < kTK * D / 4 / 128; ++i) {
      const int idx = tw + 128 * i, key = idx / (D / 4), d = (idx % (D / 4)) * 4;
      const int pos = tpos[key];
      if (pos >= 0) red_add_v4(dst + static_cast<int64_t>(pos) * D + d, *reinterpret_cast<const float4*>(&stage[at(key, d)]));
    }
  }

  if (want_dgate && tid < kTK) {  // this CTA's part of the block's term: sum over F of dgate / |F|
    frac_sum = warp_sum(frac_sum);
    const int block_at = row * p.num_blocks + t, nf = gp.nfrac[block_at];
    if (lane == 0 && frac_sum != 0.0 && nf > 0) red_add_f64(&gp.block_term[block_at], frac_sum / nf);
  }
  T* dqg = static_cast<T*>(gp.dq);
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int lr = fragment_row<RB>(wg, rb, wq, hr, g);
      if (lr < rows_here) {
        T* rowp = dqg + geo.row_index(p, row_begin + lr) * D + 2 * c4;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
          *reinterpret_cast<uint32_t*>(rowp + j * 8) =
              Mma<T>::pack(dq[rb][4 * j + 2 * hr] * p.scale, dq[rb][4 * j + 2 * hr + 1] * p.scale);
      }
    }
}

template <typename T, int D, int RB>
void launch_bwd_rows(const AttnParams& p, const BwdParams& g, cudaStream_t stream) {
  constexpr size_t smem = bwd_smem_bytes<D, RB>();
  static_assert(smem <= 232448, "more shared memory than a CTA may have on sm_90");
  const dim3 grid = CtaWork::grid(p, 1);
  allow_dynamic_smem<bwd_kernel<T, D, RB>>(smem);
  bwd_kernel<T, D, RB><<<grid, kThreads, smem, stream>>>(p, g);
}

template <typename T, int D>
void launch_bwd(const AttnParams& p, const BwdParams& g, cudaStream_t stream) {
  if (p.row_blocks == 2)
    launch_bwd_rows<T, D, 2>(p, g, stream);
  else
    launch_bwd_rows<T, D, 1>(p, g, stream);
}

// ---- d scores -------------------------------------------------------------------------------

// One thread per key: du[j] -= sum of block_term over the blocks where j is fractional (one range,
// tau being non-decreasing), from the prefix sums; then cast.
__global__ void scores_grad_keys_kernel(const SelectParams p, const double* tau, const double* prefix, double* du,
                                        float* dscores) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;
  if (j >= p.num_keys) return;
  const int64_t rj = static_cast<int64_t>(row) * p.num_keys + j;
  double d = du[rj];
  const bool valid = p.key_valid == nullptr || p.key_valid[static_cast<int64_t>(row / p.kv_heads) * p.num_keys + j];
  if (j >= p.sinks && j <= p.last_candidate && valid) {
    const int64_t t_abs = (static_cast<int64_t>(j) + p.window + p.block_q - 1) / p.block_q;
    const int t_first = static_cast<int>(t_abs > p.first_block ? t_abs - p.first_block : 0);
    if (t_first < p.num_blocks) {
      const double* tr = tau + static_cast<int64_t>(row) * p.num_blocks;
      const double uj = p.scores[rj];
      // first block in [t_first, T) where uj - tau < 1, and where uj - tau <= 0
      int lo = t_first, hi = p.num_blocks;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (uj - tr[mid] >= 1.0) lo = mid + 1; else hi = mid;
      }
      const int a = lo;
      hi = p.num_blocks;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (uj - tr[mid] > 0.0) lo = mid + 1; else hi = mid;
      }
      const int b = lo;
      const double* pre = prefix + static_cast<int64_t>(row) * (p.num_blocks + 1);
      if (a < b) d -= pre[b] - pre[a];
    }
  }
  dscores[rj] = static_cast<float>(d);
}

// One prefix-sum line per row: prefix[row][0] = 0, prefix[row][t + 1] = sum of block_term[row][<= t]
// (one warp per row: the lines are a few hundred to a few thousand blocks).
__global__ void block_prefix_kernel(const double* block_term, double* prefix, int rows, int num_blocks) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const double* in = block_term + static_cast<int64_t>(row) * num_blocks;
  double* outp = prefix + static_cast<int64_t>(row) * (num_blocks + 1);
  if (lane == 0) outp[0] = 0.0;
  double carry = 0.0;
  for (int base = 0; base < num_blocks; base += 32) {
    const int t = base + lane;
    const double x = warp_inclusive_scan(t < num_blocks ? in[t] : 0.0);
    if (t < num_blocks) outp[t + 1] = carry + x;
    carry += __shfl_sync(0xffffffffu, x, 31);
  }
}

// The backward's prologue in one launch: delta = rowsum(dout * out) in fp32 (kLanes lanes of 16
// bytes per row, four rows per lane group in flight) and the zeroing of the buffers the backward
// kernel adds into. Both are bound by memory bandwidth, and one grid-stride launch replaces the
// row-dot kernel and three fills.
template <typename T, int D>
__global__ void __launch_bounds__(256) bwd_prologue_kernel(const T* dout, const T* out, float* delta, int64_t rows,
                                                           const ZeroSpans z) {
  constexpr int kLanes = D / 8, kGroups = 32 / kLanes, kUnroll = 4;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < ZeroSpans::kMax; ++i) {
    uint4* dst = static_cast<uint4*>(z.ptr[i]);
    const int64_t n16 = z.bytes[i] / 16;
    for (int64_t e = gtid; e < n16; e += threads) dst[e] = make_uint4(0u, 0u, 0u, 0u);
    unsigned char* tail = static_cast<unsigned char*>(z.ptr[i]);
    for (int64_t e = n16 * 16 + gtid; e < z.bytes[i]; e += threads) tail[e] = 0;
  }
  const int lane = threadIdx.x & 31, sub = lane % kLanes;
  const int64_t groups = threads / 32 * kGroups;
  // The bound is the warp's (its first group's row), so the shuffles below see every lane.
  for (int64_t w0 = gtid / 32 * kGroups; w0 < rows; w0 += groups * kUnroll) {
    const int64_t r0 = w0 + lane / kLanes;
    uint4 a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t r = r0 + u * groups;
      if (r < rows) {
        a[u] = *reinterpret_cast<const uint4*>(dout + r * D + sub * 8);
        b[u] = *reinterpret_cast<const uint4*>(out + r * D + sub * 8);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t r = r0 + u * groups;
      float acc = 0.f;
      if (r < rows) {
        const T* ap = reinterpret_cast<const T*>(&a[u]);
        const T* bp = reinterpret_cast<const T*>(&b[u]);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc += Mma<T>::to_float(ap[i]) * Mma<T>::to_float(bp[i]);
      }
#pragma unroll
      for (int o = kLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (r < rows && sub == 0) delta[r] = acc;
    }
  }
}

// dK and dV from their one fp32 buffer [2][n] to q's dtype, eight elements a thread per step.
template <typename T>
__global__ void __launch_bounds__(256) cast_pair_kernel(const float* acc, T* out0, T* out1, int64_t n) {
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n8 = n / 8;
  for (int64_t e = gtid; e < 2 * n8; e += threads) {
    const int half = e >= n8;
    const int64_t i = (e - half * n8) * 8;
    const float4 x = *reinterpret_cast<const float4*>(acc + half * n + i);
    const float4 y = *reinterpret_cast<const float4*>(acc + half * n + i + 4);
    uint4 o;
    o.x = Mma<T>::pack(x.x, x.y);
    o.y = Mma<T>::pack(x.z, x.w);
    o.z = Mma<T>::pack(y.x, y.y);
    o.w = Mma<T>::pack(y.z, y.w);
    *reinterpret_cast<uint4*>((half ? out1 : out0) + i) = o;
  }
  for (int64_t i = n8 * 8 + gtid; i < n; i += threads) {  // the n % 8 tail
    out0[i] = Mma<T>::from_float(acc[i]);
    out1[i] = Mma<T>::from_float(acc[n + i]);
  }
}

// Grids of memory-bound kernels: enough resident threads on every SM to keep loads in flight.
unsigned streaming_grid(int64_t work_per_thread_units) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t full = static_cast<int64_t>(sms) * 8;
  const int64_t need = (work_per_thread_units + 255) / 256;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(full, need)));
}

template <typename T>
void launch_prologue(const void* dout, const void* out, float* delta, int64_t rows, int head_dim, const ZeroSpans& zero,
                     unsigned grid, cudaStream_t stream) {
  const T* d = static_cast<const T*>(dout);
  const T* o = static_cast<const T*>(out);
  if (head_dim == 64)
    bwd_prologue_kernel<T, 64><<<grid, 256, 0, stream>>>(d, o, delta, rows, zero);
  else
    bwd_prologue_kernel<T, 128><<<grid, 256, 0, stream>>>(d, o, delta, rows, zero);
}

}  // namespace

void bwd_prologue(const void* dout, const void* out, float* delta, int64_t rows, int head_dim, const ZeroSpans& zero,
                  DType dtype, cudaStream_t stream) {
  int64_t units = rows * head_dim / 8;
  for (int i = 0; i < ZeroSpans::kMax; ++i) units = std::max<int64_t>(units, zero.bytes[i] / 16);
  if (units == 0) return;
  const unsigned grid = streaming_grid(units);
  if (dtype == DType::kBFloat16)
    launch_prologue<__nv_bfloat16>(dout, out, delta, rows, head_dim, zero, grid, stream);
  else
    launch_prologue<__half>(dout, out, delta, rows, head_dim, zero, grid, stream);
}

void cast_pair(const float* acc, void* out0, void* out1, int64_t n, DType dtype, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned grid = streaming_grid(2 * ((n + 7) / 8));
  if (dtype == DType::kBFloat16)
    cast_pair_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(acc, static_cast<__nv_bfloat16*>(out0),
                                                             static_cast<__nv_bfloat16*>(out1), n);
  else
    cast_pair_kernel<__half><<<grid, 256, 0, stream>>>(acc, static_cast<__half*>(out0), static_cast<__half*>(out1), n);
}

void attention_bwd(const AttnParams& p, const BwdParams& g, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kBFloat16) {
    if (p.head_dim == 64) launch_bwd<__nv_bfloat16, 64>(p, g, stream);
    else launch_bwd<__nv_bfloat16, 128>(p, g, stream);
  } else {
    if (p.head_dim == 64) launch_bwd<__half, 64>(p, g, stream);
    else launch_bwd<__half, 128>(p, g, stream);
  }
}

void scores_grad_prefix(const double* block_term, double* prefix, int rows, int num_blocks, cudaStream_t stream) {
  if (rows == 0) return;
  block_prefix_kernel<<<(rows + 7) / 8, 256, 0, stream>>>(block_term, prefix, rows, num_blocks);
}

void scores_grad_keys(const SelectParams& p, const double* tau, const double* prefix, double* du, float* dscores,
                      cudaStream_t stream) {
  if (p.num_keys == 0 || p.rows == 0) return;
  const dim3 grid((p.num_keys + 255) / 256, p.rows);
  scores_grad_keys_kernel<<<grid, 256, 0, stream>>>(p, tau, prefix, du, dscores);
}

}  // namespace sparsek_cuda
