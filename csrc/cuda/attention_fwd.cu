// SparseK attention forward on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// One CTA = one (batch, kv head, query block) and up to 256 query rows: every query head of the GQA
// group times the block's queries (G * block_q = 4 * 64 for the benchmark), so each gathered K/V
// tile is read from global memory once per group. 8 warps, 32 rows each (two m16 tiles: each K/V
// fragment read from shared memory feeds two mma, which keeps shared-memory traffic under the
// tensor-core rate). Keys come in tiles of 64 gathered by position with cp.async (16-byte rows
// pieces, zero-filled past the list), double-buffered so the next tile's gather overlaps this
// tile's math. Online softmax in fp32 in the log2 domain; the gate enters as the additive bias
// log2(gate); causal masking is only ever needed in the window's last tiles.
// Decode (few CTAs, long key lists): the key tiles are split across CTAs and merged by lse.
#include "block_keys.cuh"

namespace sparsek_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 32;
constexpr int kBC = 64;     // keys per tile
constexpr int kMeta = 4096; // keys whose position and bias sit in shared memory at once

template <int D>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(kRows * D + 4 * kBC * D) * 2 + kMeta * 8 + 2 * kBC * 4;
}

// One tile of keys for one warp's 32 rows: S = Q K^T, online softmax with the log-gate bias and
// the causal limit, O += P V. NSUB = 16-key slices present (4 for a full tile).
template <typename T, int D, int NSUB>
__device__ __forceinline__ void attend_tile(const T* Qs, const T* kt, const T* vt, const float* bias, int warp,
                                            int lane, bool need_mask, const int (&lim)[2][2], int key0,
                                            float scale2, float (&acc)[2][D / 8][4], float (&m)[2][2],
                                            float (&l)[2][2]) {
  const int c4 = lane & 3;
  float s[2][NSUB * 2][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int j = 0; j < NSUB * 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][j][e] = 0.f;

#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
      ldmatrix_x4(a[mi], &Qs[swz<D>(warp * 32 + mi * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)]);
#pragma unroll
    for (int np = 0; np < NSUB; ++np) {
      uint32_t bk[4];
      ldmatrix_x4(bk, &kt[swz<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + ((lane >> 3) & 1) * 8)]);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        Mma<T>::mma(s[mi][2 * np], a[mi], bk[0], bk[1]);
        Mma<T>::mma(s[mi][2 * np + 1], a[mi], bk[2], bk[3]);
      }
    }
  }

  // Online softmax (log2 domain).
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int limit = lim[mi][hr] - key0;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NSUB * 2; ++j) {
        const float2 bb = *reinterpret_cast<const float2*>(&bias[j * 8 + 2 * c4]);
        float v0 = fmaf(s[mi][j][2 * hr], scale2, bb.x);
        float v1 = fmaf(s[mi][j][2 * hr + 1], scale2, bb.y);
        if (need_mask) {
          if (j * 8 + 2 * c4 > limit) v0 = -INFINITY;
          if (j * 8 + 2 * c4 + 1 > limit) v1 = -INFINITY;
        }
        s[mi][j][2 * hr] = v0;
        s[mi][j][2 * hr + 1] = v1;
        mx = fmaxf(mx, fmaxf(v0, v1));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[mi][hr], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float corr = exp2f(m[mi][hr] - m_use);
      m[mi][hr] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < NSUB * 2; ++j) {
        const float p0 = exp2f(s[mi][j][2 * hr] - m_use);
        const float p1 = exp2f(s[mi][j][2 * hr + 1] - m_use);
        s[mi][j][2 * hr] = p0;
        s[mi][j][2 * hr + 1] = p1;
        rs += p0 + p1;
      }
      l[mi][hr] = l[mi][hr] * corr + rs;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[mi][j][2 * hr] *= corr;
        acc[mi][j][2 * hr + 1] *= corr;
      }
    }
  }

  // O += P V
#pragma unroll
  for (int kk = 0; kk < NSUB; ++kk) {
    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      a[mi][0] = Mma<T>::pack(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      a[mi][1] = Mma<T>::pack(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      a[mi][2] = Mma<T>::pack(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      a[mi][3] = Mma<T>::pack(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, &vt[swz<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 16 + (lane >> 4) * 8)]);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        Mma<T>::mma(acc[mi][2 * dp], a[mi], bv[0], bv[1]);
        Mma<T>::mma(acc[mi][2 * dp + 1], a[mi], bv[2], bv[3]);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const AttnParams p, const FwdOut o) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kRows * D;
  T* Vs = Ks + 2 * kBC * D;
  int* meta_pos = reinterpret_cast<int*>(Vs + 2 * kBC * D);
  float* meta_bias = reinterpret_cast<float*>(meta_pos + kMeta);
  float* tile_bias = meta_bias + kMeta;  // [2][kBC]

  constexpr int CH = D / 8;  // 16-byte chunks per row
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row = blockIdx.y;
  int x = blockIdx.x;
  const int split = x % o.num_splits;
  x /= o.num_splits;
  const int chunk = x % p.row_chunks;
  const int t = x / p.row_chunks;

  BlockGeo geo;
  geo.init(p, row, t);
  const int rows_total = p.group * geo.nr;
  const int row_begin = chunk * kRows;
  if (row_begin >= rows_total) return;
  const int rows_here = min(kRows, rows_total - row_begin);
  const int tiles = (geo.L + kBC - 1) / kBC;
  const int tile_begin = static_cast<int>(static_cast<int64_t>(split) * tiles / o.num_splits);
  const int tile_end = static_cast<int>(static_cast<int64_t>(split + 1) * tiles / o.num_splits);

  const T* qg = static_cast<const T*>(p.q);
  const T* kg = static_cast<const T*>(p.k) + geo.b * p.k_stride[0] + geo.h * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + geo.b * p.v_stride[0] + geo.h * p.v_stride[1];

  // Q rows of the CTA (zeros past rows_here).
  for (int i = tid; i < kRows * CH; i += kThreads) {
    const int r = i / CH, c = i % CH;
    const bool ok = r < rows_here;
    const T* src = ok ? qg + geo.q_offset(p, row_begin + r, p.q_stride) + c * 8 : qg;
    cp_async16(&Qs[swz<D>(r, c * 8)], src, ok ? 16 : 0);
  }

  int meta_base = tile_begin * kBC;
  auto load_meta = [&](int base) {
    geo.load_keys(p, base, tile_end * kBC, kMeta, meta_pos, meta_bias, tid, kThreads);
  };
  auto issue_tile = [&](int n, int st) {
    gather_kv_tile<T, D, kBC>(kg, vg, p.k_stride[2], p.v_stride[2], meta_pos + n * kBC - meta_base,
                              Ks + st * kBC * D, Vs + st * kBC * D, tid, kThreads,
                              [](int r, int c) { return swz<D>(r, c); });
    if (tid < kBC) tile_bias[st * kBC + tid] = meta_bias[n * kBC + tid - meta_base];
    cp_async_commit();
  };

  if (tile_begin < tile_end) {
    load_meta(meta_base);
    __syncthreads();
    issue_tile(tile_begin, 0);
  } else {
    cp_async_commit();
  }

  const float scale2 = p.scale * kLog2e;
  const int g = lane >> 2, c4 = lane & 3;
  const bool warp_active = warp * 32 < rows_here;
  // Causal limit per row: key column kk of tile n is masked when kk > lim - n * kBC.
  int lim[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int lr = warp * 32 + mi * 16 + hr * 8 + g;
      const int pos = lr < rows_here ? geo.position(row_begin + lr) : 0x3fffffff;
      lim[mi][hr] = lr < rows_here ? pos - geo.wb + geo.wstart : 0x3fffffff;
    }

  float acc[2][D / 8][4];
  float m[2][2], l[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][j][e] = 0.f;
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.f;
  }

  for (int n = tile_begin; n < tile_end; ++n) {
    const int st = (n - tile_begin) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (n + 1 < tile_end) {
      if ((n + 2) * kBC - meta_base > kMeta) {  // next tile's keys are past the loaded metadata
        meta_base = (n + 1) * kBC;
        load_meta(meta_base);
        __syncthreads();
      }
      issue_tile(n + 1, st ^ 1);
    }
    if (!warp_active) continue;

    const int keys_here = min(kBC, geo.L - n * kBC);
    const T* kt = Ks + st * kBC * D;
    const T* vt = Vs + st * kBC * D;
    const float* bias = tile_bias + st * kBC;
    const int last_key = n * kBC + keys_here - 1;
    const bool need_mask = last_key >= geo.wstart && geo.wb + (last_key - geo.wstart) > geo.first_pos;
    // A ragged last tile only pays for the 16-key slices it holds.
    if (keys_here > 48) attend_tile<T, D, 4>(Qs, kt, vt, bias, warp, lane, need_mask, lim, n * kBC, scale2, acc, m, l);
    else if (keys_here > 32) attend_tile<T, D, 3>(Qs, kt, vt, bias, warp, lane, need_mask, lim, n * kBC, scale2, acc, m, l);
    else if (keys_here > 16) attend_tile<T, D, 2>(Qs, kt, vt, bias, warp, lane, need_mask, lim, n * kBC, scale2, acc, m, l);
    else attend_tile<T, D, 1>(Qs, kt, vt, bias, warp, lane, need_mask, lim, n * kBC, scale2, acc, m, l);
  }

  if (!warp_active) return;
  // Epilogue: normalise, write lse, and out (staged through this warp's own Q rows) or the split's
  // partial result.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float lsum = l[mi][hr];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      const float lse = lsum > 0.f ? (m[mi][hr] + log2f(lsum)) * kLn2 : -INFINITY;
      const int lr = warp * 32 + mi * 16 + hr * 8 + g;
      const bool ok = lr < rows_here;
      const int64_t ri = ok ? geo.row_index(p, row_begin + lr) : 0;
      if (o.num_splits > 1) {
        const int64_t rows_all = static_cast<int64_t>(p.batch) * p.q_heads * p.num_queries;
        if (ok) {
          float* dst = o.o_part + (split * rows_all + ri) * D;
#pragma unroll
          for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<float2*>(&dst[j * 8 + 2 * c4]) =
                make_float2(acc[mi][j][2 * hr] * inv, acc[mi][j][2 * hr + 1] * inv);
          if (c4 == 0) o.lse_part[split * rows_all + ri] = lse;
        }
      } else {
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
          *reinterpret_cast<uint32_t*>(&Qs[swz<D>(lr, j * 8 + 2 * c4)]) =
              Mma<T>::pack(acc[mi][j][2 * hr] * inv, acc[mi][j][2 * hr + 1] * inv);
        if (ok && c4 == 0) o.lse[ri] = lse;
      }
    }
  }
  if (o.num_splits == 1) {
    __syncwarp();
    T* out = static_cast<T*>(o.out);
    for (int i = lane; i < 32 * CH; i += 32) {
      const int r = i / CH, c = i % CH;
      const int lr = warp * 32 + r;
      if (lr < rows_here) {
        const int64_t ri = geo.row_index(p, row_begin + lr);
        *reinterpret_cast<uint4*>(out + ri * D + c * 8) = *reinterpret_cast<const uint4*>(&Qs[swz<D>(lr, c * 8)]);
      }
    }
  }
}

// out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s): one warp per query row.
template <typename T, int D>
__global__ void merge_splits_kernel(const FwdOut o, int64_t rows_all) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows_all) return;
  float mx = -INFINITY;
  for (int s = 0; s < o.num_splits; ++s) mx = fmaxf(mx, o.lse_part[s * rows_all + r]);
  float acc[D / 32];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) acc[i] = 0.f;
  float total = 0.f;
  if (mx > -INFINITY) {
    for (int s = 0; s < o.num_splits; ++s) {
      const float w = __expf(o.lse_part[s * rows_all + r] - mx);
      total += w;
      const float* src = o.o_part + (s * rows_all + r) * D;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) acc[i] += w * src[lane + 32 * i];
    }
  }
  T* out = static_cast<T*>(o.out) + r * D;
  const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) out[lane + 32 * i] = Mma<T>::from_float(acc[i] * inv);
  if (lane == 0) o.lse[r] = total > 0.f ? mx + logf(total) : -INFINITY;
}

template <typename T, int D>
void launch_fwd(const AttnParams& p, const FwdOut& o, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<D>();
  cudaFuncSetAttribute(fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const dim3 grid(p.num_blocks * p.row_chunks * o.num_splits, p.batch * p.kv_heads);
  fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p, o);
  if (o.num_splits > 1) {
    const int64_t rows_all = static_cast<int64_t>(p.batch) * p.q_heads * p.num_queries;
    merge_splits_kernel<T, D><<<static_cast<unsigned>((rows_all + 7) / 8), 256, 0, stream>>>(o, rows_all);
  }
}

}  // namespace

int fwd_rows_per_cta() { return kRows; }

void attention_fwd(const AttnParams& p, const FwdOut& o, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kBFloat16) {
    if (p.head_dim == 64) launch_fwd<__nv_bfloat16, 64>(p, o, stream);
    else launch_fwd<__nv_bfloat16, 128>(p, o, stream);
  } else {
    if (p.head_dim == 64) launch_fwd<__half, 64>(p, o, stream);
    else launch_fwd<__half, 128>(p, o, stream);
  }
}

}  // namespace sparsek_cuda
