// SparseK attention backward on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// One CTA = one (batch, kv head, query block) and up to 128 query rows of the GQA group (8 warps
// of 16 rows). For each gathered tile of 64 keys:
//   S = Q K^T, dP = dO V^T                      (per warp, 16 rows x 64 keys, in registers)
//   P = exp2(S*scale*log2e - lse2) * gate,  dS = P_raw (dP - delta) * gate
//   dgate[slot] += sum over rows of P_raw (dP - delta)        (selected keys only)
//   dQ += dS K                                  (registers, one write at the end)
//   dV += P^T dO, dK += dS^T Q                  (P, dS staged in shared memory; each warp one
//                                                16-key x D/2 block, staged in fp32 and added to
//                                                the global dk/dv buffers (a key is shared by many
//                                                query blocks) by bulk reductions, one per key row)
// d scores from dgate run afterwards (scores_grad_* below), like scores_grad_cpu.
#include "block_keys.cuh"

namespace sparsek_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;
constexpr int kBC = 64;
constexpr int kMeta = 2048;

// dK / dV staging of one warp: its 16 keys x D/2 head dims in fp32, rows padded by 8 floats so the
// fragment stores of rows r and r+4 are the only ones to share banks.
template <int D>
constexpr int stage_pitch() { return D / 2 + 8; }

template <int D>
constexpr size_t bwd_smem_bytes() {
  // Q, dO [kRows][D]; K, V [2][kBC][D]; P, dS [kRows][kBC]; lse2, delta [kRows]; metadata;
  // per-stage bias, gate and position of the tile's keys.
  return static_cast<size_t>(2 * kRows * D + 4 * kBC * D + 2 * kRows * kBC) * 2 + 2 * kRows * 4 + kMeta * 8 +
         2 * kBC * 12 + kWarps * 16 * stage_pitch<D>() * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_kernel(const AttnParams p, const BwdParams gp) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + kRows * D;
  T* Ks = dOs + kRows * D;
  T* Vs = Ks + 2 * kBC * D;
  T* Ps = Vs + 2 * kBC * D;
  T* dSs = Ps + kRows * kBC;
  float* lse_s = reinterpret_cast<float*>(dSs + kRows * kBC);
  float* delta_s = lse_s + kRows;
  int* meta_pos = reinterpret_cast<int*>(delta_s + kRows);
  float* meta_bias = reinterpret_cast<float*>(meta_pos + kMeta);
  float* tile_bias = meta_bias + kMeta;            // [2][kBC] log2 gate
  float* tile_gate = tile_bias + 2 * kBC;          // [2][kBC] gate (0 for masked keys)
  int* tile_pos = reinterpret_cast<int*>(tile_gate + 2 * kBC);  // [2][kBC]
  float* stage = reinterpret_cast<float*>(tile_pos + 2 * kBC) + (threadIdx.x >> 5) * 16 * stage_pitch<D>();

  constexpr int CH = D / 8;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row = blockIdx.y;
  const int chunk = blockIdx.x % p.row_chunks;
  const int t = blockIdx.x / p.row_chunks;

  BlockGeo geo;
  geo.init(p, row, t);
  const int rows_total = p.group * geo.nr;
  const int row_begin = chunk * kRows;
  if (row_begin >= rows_total) return;
  const int rows_here = min(kRows, rows_total - row_begin);
  const int tiles = (geo.L + kBC - 1) / kBC;

  const T* qg = static_cast<const T*>(p.q);
  const T* dog = static_cast<const T*>(gp.dout);
  const T* kg = static_cast<const T*>(p.k) + geo.b * p.k_stride[0] + geo.h * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + geo.b * p.v_stride[0] + geo.h * p.v_stride[1];
  const int64_t dout_stride[3] = {static_cast<int64_t>(p.q_heads) * p.num_queries * D,
                                  static_cast<int64_t>(p.num_queries) * D, D};

  for (int i = tid; i < kRows * CH; i += kThreads) {
    const int r = i / CH, c = i % CH;
    const bool ok = r < rows_here;
    const T* qs = ok ? qg + geo.q_offset(p, row_begin + r, p.q_stride) + c * 8 : qg;
    const T* ds = ok ? dog + geo.q_offset(p, row_begin + r, dout_stride) + c * 8 : dog;
    cp_async16(&Qs[swz<D>(r, c * 8)], qs, ok ? 16 : 0);
    cp_async16(&dOs[swz<D>(r, c * 8)], ds, ok ? 16 : 0);
  }
  for (int r = tid; r < kRows; r += kThreads) {
    float lse2 = INFINITY, delta = 0.f;  // padding rows and rows with no key: P = 0
    if (r < rows_here) {
      const int64_t ri = geo.row_index(p, row_begin + r);
      const float lse = gp.lse[ri];
      if (lse != -INFINITY) lse2 = lse * kLog2e;
      delta = gp.delta[ri];
    }
    lse_s[r] = lse2;
    delta_s[r] = delta;
  }

  int meta_base = 0;
  auto load_meta = [&](int base) {
    geo.load_keys(p, base, tiles * kBC, kMeta, meta_pos, meta_bias, tid, kThreads);
  };
  auto issue_tile = [&](int n, int st) {
    gather_kv_tile<T, D, kBC>(kg, vg, p.k_stride[2], p.v_stride[2], meta_pos + n * kBC - meta_base,
                              Ks + st * kBC * D, Vs + st * kBC * D, tid, kThreads);
    if (tid < kBC) {
      const float b2 = meta_bias[n * kBC + tid - meta_base];
      tile_bias[st * kBC + tid] = b2;
      tile_gate[st * kBC + tid] = exp2f(b2);
      tile_pos[st * kBC + tid] = b2 == -INFINITY ? -1 : meta_pos[n * kBC + tid - meta_base];
    }
    cp_async_commit();
  };

  if (tiles > 0) {
    load_meta(0);
    __syncthreads();
    issue_tile(0, 0);
  } else {
    cp_async_commit();
  }

  const float scale2 = p.scale * kLog2e;
  const int g = lane >> 2, c4 = lane & 3;
  const bool want_dgate = gp.dgate != nullptr;
  const int64_t dgate_base = (static_cast<int64_t>(row) * p.num_blocks + t) * p.width - geo.n_sink;
  int lim[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int lr = warp * 16 + hr * 8 + g;
    lim[hr] = lr < rows_here ? geo.position(row_begin + lr) - geo.wb + geo.wstart : 0x3fffffff;
  }
  // This warp's block of the dK/dV tile: keys km*16.., head dims dh*D/2..
  const int km = warp & 3, dh = warp >> 2;
  constexpr int DN = D / 2 / 8;  // n8 tiles of the half head dim

  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[j][e] = 0.f;

  for (int n = 0; n < tiles; ++n) {
    const int st = n & 1;
    cp_async_wait_all();
    __syncthreads();
    if (n + 1 < tiles) {
      if ((n + 2) * kBC - meta_base > kMeta) {
        meta_base = (n + 1) * kBC;
        load_meta(meta_base);
        __syncthreads();
      }
      issue_tile(n + 1, st ^ 1);
    }
    const T* kt = Ks + st * kBC * D;
    const T* vt = Vs + st * kBC * D;
    const float* bias = tile_bias + st * kBC;
    const float* gate = tile_gate + st * kBC;
    const int last_key = min((n + 1) * kBC, geo.L) - 1;
    const bool need_mask = last_key >= geo.wstart && geo.wb + (last_key - geo.wstart) > geo.first_pos;
    const bool tile_has_sel = want_dgate && n * kBC < geo.wstart && (n + 1) * kBC > geo.n_sink;

    float s[kBC / 8][4], dp[kBC / 8][4];
#pragma unroll
    for (int j = 0; j < kBC / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ad[4];
      ldmatrix_x4(aq, &Qs[swz<D>(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)]);
      ldmatrix_x4(ad, &dOs[swz<D>(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)]);
#pragma unroll
      for (int np = 0; np < kBC / 16; ++np) {
        uint32_t bk[4], bv[4];
        const int kr = np * 16 + (lane & 7) + ((lane >> 4) << 3), kc = kk * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(bk, &kt[swz<D>(kr, kc)]);
        ldmatrix_x4(bv, &vt[swz<D>(kr, kc)]);
        Mma<T>::mma(s[2 * np], aq, bk[0], bk[1]);
        Mma<T>::mma(s[2 * np + 1], aq, bk[2], bk[3]);
        Mma<T>::mma(dp[2 * np], ad, bv[0], bv[1]);
        Mma<T>::mma(dp[2 * np + 1], ad, bv[2], bv[3]);
      }
    }

    // s <- P (gated), dp <- dS (gated); colsum of the ungated dS for dgate.
    float col[kBC / 8][2];
#pragma unroll
    for (int j = 0; j < kBC / 8; ++j) col[j][0] = col[j][1] = 0.f;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int lr = warp * 16 + hr * 8 + g;
      const float lse2 = lse_s[lr], delta = delta_s[lr];
      const int limit = lim[hr] - n * kBC;
#pragma unroll
      for (int j = 0; j < kBC / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int kc = j * 8 + 2 * c4 + e;
          const bool masked = bias[kc] == -INFINITY || (need_mask && kc > limit);
          const float praw = masked ? 0.f : exp2f(s[j][2 * hr + e] * scale2 - lse2);
          const float dsraw = praw * (dp[j][2 * hr + e] - delta);
          col[j][e] += dsraw;
          s[j][2 * hr + e] = praw * gate[kc];
          dp[j][2 * hr + e] = dsraw * gate[kc];
        }
      }
      // Stage P and dS rows for the dK / dV products.
#pragma unroll
      for (int j = 0; j < kBC / 8; ++j) {
        *reinterpret_cast<uint32_t*>(&Ps[swz<kBC>(lr, j * 8 + 2 * c4)]) = Mma<T>::pack(s[j][2 * hr], s[j][2 * hr + 1]);
        *reinterpret_cast<uint32_t*>(&dSs[swz<kBC>(lr, j * 8 + 2 * c4)]) =
            Mma<T>::pack(dp[j][2 * hr], dp[j][2 * hr + 1]);
      }
    }
    if (tile_has_sel) {
#pragma unroll
      for (int j = 0; j < kBC / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = col[j][e];
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          v += __shfl_xor_sync(0xffffffffu, v, 8);
          v += __shfl_xor_sync(0xffffffffu, v, 16);
          const int key = n * kBC + j * 8 + 2 * c4 + e;
          if (g == 0 && key >= geo.n_sink && key < geo.wstart) atomicAdd(&gp.dgate[dgate_base + key], v);
        }
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < kBC / 16; ++kk) {
      uint32_t a[4];
      a[0] = Mma<T>::pack(dp[2 * kk][0], dp[2 * kk][1]);
      a[1] = Mma<T>::pack(dp[2 * kk][2], dp[2 * kk][3]);
      a[2] = Mma<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      a[3] = Mma<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, &kt[swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dn * 16 + (lane >> 4) * 8)]);
        Mma<T>::mma(dq[2 * dn], a, bk[0], bk[1]);
        Mma<T>::mma(dq[2 * dn + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();  // P and dS of every warp staged

    // dV = P^T dO and dK = dS^T Q for keys km*16.. and head dims dh*D/2..
    const int* tpos = tile_pos + st * kBC;
    // One product at a time (half the live registers), each staged in fp32 and added to global
    // memory row by row by the bulk-copy engine: lanes 0-15 issue one row each.
    auto flush = [&](const float (&acc)[DN][4], float mul, float* dst) {
      if (lane < 16) bulk_wait_read();  // this warp's previous rows have left the stage
      __syncwarp();
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int j = 0; j < DN; ++j)
          *reinterpret_cast<float2*>(&stage[(hr * 8 + g) * stage_pitch<D>() + j * 8 + 2 * c4]) =
              make_float2(acc[j][2 * hr] * mul, acc[j][2 * hr + 1] * mul);
      fence_async_shared();
      __syncwarp();
      if (lane < 16) {
        const int pos = tpos[km * 16 + lane];
        if (pos >= 0)
          bulk_reduce_add(dst + ((static_cast<int64_t>(geo.b) * p.kv_heads + geo.h) * p.num_keys + pos) * D +
                              dh * (D / 2),
                          &stage[lane * stage_pitch<D>()], D / 2 * 4);
        bulk_commit();
      }
    };
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const T* as = pass == 0 ? Ps : dSs;
      const T* bs = pass == 0 ? dOs : Qs;
      float acc[DN][4];
#pragma unroll
      for (int j = 0; j < DN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
      for (int kr = 0; kr < kRows / 16; ++kr) {
        uint32_t a[4];
        const int pr = kr * 16 + (lane & 7) + ((lane >> 4) << 3), pc = km * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(a, &as[swz<kBC>(pr, pc)]);
#pragma unroll
        for (int np = 0; np < DN / 2; ++np) {
          uint32_t b[4];
          const int br = kr * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, bc = dh * (D / 2) + np * 16 + (lane >> 4) * 8;
          ldmatrix_x4_trans(b, &bs[swz<D>(br, bc)]);
          Mma<T>::mma(acc[2 * np], a, b[0], b[1]);
          Mma<T>::mma(acc[2 * np + 1], a, b[2], b[3]);
        }
      }
      flush(acc, pass == 0 ? 1.f : p.scale, pass == 0 ? gp.dv_acc : gp.dk_acc);
    }
  }
  if (lane < 16) bulk_wait();  // the last rows are added before the CTA's shared memory goes

  __syncthreads();  // every warp is done reading Q before it is reused to stage dQ
  const int lr0 = warp * 16 + g;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr)
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<uint32_t*>(&Qs[swz<D>(lr0 + hr * 8, j * 8 + 2 * c4)]) =
          Mma<T>::pack(dq[j][2 * hr] * p.scale, dq[j][2 * hr + 1] * p.scale);
  __syncwarp();
  T* dqg = static_cast<T*>(gp.dq);
  for (int i = lane; i < 16 * CH; i += 32) {
    const int r = i / CH, c = i % CH;
    const int lr = warp * 16 + r;
    if (lr < rows_here) {
      const int64_t ri = geo.row_index(p, row_begin + lr);
      *reinterpret_cast<uint4*>(dqg + ri * D + c * 8) = *reinterpret_cast<const uint4*>(&Qs[swz<D>(lr, c * 8)]);
    }
  }
}

template <typename T, int D>
void launch_bwd(const AttnParams& p, const BwdParams& g, cudaStream_t stream) {
  constexpr size_t smem = bwd_smem_bytes<D>();
  cudaFuncSetAttribute(bwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const dim3 grid(p.num_blocks * p.row_chunks, p.batch * p.kv_heads);
  bwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p, g);
}

// ---- d scores -------------------------------------------------------------------------------

__device__ __forceinline__ bool is_fractional(double u, double tau) {
  const double excess = u - tau;
  return excess > 0.0 && excess < 1.0;
}

// One warp per (row, block): du[j] += dgate for fractional members; block_term = their sum / |F|.
__global__ void scores_grad_blocks_kernel(const SelectParams p, const int32_t* idx, const float* dgate,
                                          const int32_t* count, const double* tau, const int32_t* nfrac, double* du,
                                          double* block_term) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * (blockDim.x >> 5) + warp;
  const int row = blockIdx.y;
  if (t >= p.num_blocks) return;
  const int64_t bt = static_cast<int64_t>(row) * p.num_blocks + t;
  const float* u = p.scores + static_cast<int64_t>(row) * p.num_keys;
  const double tb = tau[bt];
  double sum = 0.0;
  for (int s = lane; s < count[bt]; s += 32) {
    const int j = idx[bt * p.width + s];
    if (is_fractional(u[j], tb)) {
      const double d = dgate[bt * p.width + s];
      atomicAdd(&du[static_cast<int64_t>(row) * p.num_keys + j], d);
      sum += d;
    }
  }
  sum = warp_sum(sum);
  if (lane == 0) block_term[bt] = nfrac[bt] > 0 ? sum / nfrac[bt] : 0.0;
}

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

// delta = rowsum(dout * out) in fp32: one warp per row, 16-byte loads.
template <typename T>
__global__ void row_dot_kernel(const T* dout, const T* out, float* delta, int64_t rows, int head_dim) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float acc = 0.f;
  for (int c = lane * 8; c < head_dim; c += 256) {
    const uint4 a = *reinterpret_cast<const uint4*>(dout + r * head_dim + c);
    const uint4 b = *reinterpret_cast<const uint4*>(out + r * head_dim + c);
    const T* ap = reinterpret_cast<const T*>(&a);
    const T* bp = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += Mma<T>::to_float(ap[i]) * Mma<T>::to_float(bp[i]);
  }
  acc = warp_sum(acc);
  if (lane == 0) delta[r] = acc;
}

}  // namespace

void row_dot(const void* dout, const void* out, float* delta, int64_t rows, int head_dim, DType dtype,
             cudaStream_t stream) {
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>((rows + 7) / 8);
  if (dtype == DType::kBFloat16)
    row_dot_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(dout),
                                                           static_cast<const __nv_bfloat16*>(out), delta, rows, head_dim);
  else
    row_dot_kernel<__half><<<grid, 256, 0, stream>>>(static_cast<const __half*>(dout), static_cast<const __half*>(out),
                                                    delta, rows, head_dim);
}

int bwd_rows_per_cta() { return kRows; }

void attention_bwd(const AttnParams& p, const BwdParams& g, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kBFloat16) {
    if (p.head_dim == 64) launch_bwd<__nv_bfloat16, 64>(p, g, stream);
    else launch_bwd<__nv_bfloat16, 128>(p, g, stream);
  } else {
    if (p.head_dim == 64) launch_bwd<__half, 64>(p, g, stream);
    else launch_bwd<__half, 128>(p, g, stream);
  }
}

void scores_grad_blocks(const SelectParams& p, const int32_t* idx, const float* dgate, const int32_t* count,
                        const double* tau, const int32_t* nfrac, double* du, double* block_term,
                        cudaStream_t stream) {
  if (p.num_blocks == 0 || p.rows == 0) return;
  const dim3 grid((p.num_blocks + 7) / 8, p.rows);
  scores_grad_blocks_kernel<<<grid, 256, 0, stream>>>(p, idx, dgate, count, tau, nfrac, du, block_term);
}

void scores_grad_keys(const SelectParams& p, const double* tau, const double* prefix, double* du, float* dscores,
                      cudaStream_t stream) {
  if (p.num_keys == 0 || p.rows == 0) return;
  const dim3 grid((p.num_keys + 255) / 256, p.rows);
  scores_grad_keys_kernel<<<grid, 256, 0, stream>>>(p, tau, prefix, du, dscores);
}

}  // namespace sparsek_cuda
