// SparseK attention forward on Hopper tensor cores (wgmma, fp32 accumulate).
//
// One CTA = one (batch, kv head, query block) and up to 128 * RB query rows: every query head of the
// GQA group times the block's queries (G * block_q = 4 * 64 for the benchmark), so each gathered K/V
// tile is read from global memory once per group. Warp-specialized, as FA3: a producer warpgroup
// (24 registers) gathers Q and then the key tiles by position with cp.async (16-byte row pieces,
// zero-filled past the list) into a ring of kStages stages, each with a full and an empty
// mbarrier, so no CTA-wide barrier sits in the tile loop. Two consumer warpgroups (240 registers)
// each own RB row blocks of 64 rows (RB = 2 when the block has more than 128 rows,
// AttnParams::row_blocks) and take turns (ping-pong) to issue S = Q K^T for their row blocks
// (wgmma m64n64, Q and K from shared memory), so that one's softmax runs under the other's
// products. Then per row block: online softmax in fp32 in the log2 domain (the gate enters as the
// additive bias log2(gate); causal masking is only ever needed in the window's last tiles), and
// O += P V (wgmma m64nD, P from registers, V read MN-major), which runs while the next row block's
// softmax does. Every row block runs its wgmma even when it holds no row of the call (decode): a
// branch around them, uniform per warpgroup at run time but not provably so, makes ptxas
// serialize every wgmma of the kernel. Tiles use wgmma's 128-byte swizzle (D/64 panels of rows x
// 64 elements). Decode (few CTAs, long key lists): the key tiles are split across CTAs and merged
// by lse.
#include "block_keys.cuh"
#include "wgmma.cuh"

namespace sparsek_cuda {
namespace {

constexpr int kThreads = 384;  // a producer warpgroup and two consumer warpgroups
constexpr int kBC = 64;        // keys per tile
constexpr int kStages = 3;     // K / V tiles in flight
// How far (log2 units) a row's scores may pass its running max before the max moves (FA4's
// conditional rescaling): P <= 2^8 is exact in fp32 sums and loses nothing as a bf16 operand.
constexpr float kRescaleSlack = 8.f;

// Q [128 * RB][D]; K, V [kStages][kBC][D]; per-stage bias and position; full / empty mbarriers;
// 1024 bytes to align the base (166448 bytes at D = 128, RB = 2).
template <int D, int RB>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(128 * RB * D + 2 * kStages * kBC * D) * 2 + kStages * kBC * 8 + 2 * kStages * 8 +
         kSmemAlignSlack;
}

template <typename T, int D, int RB>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const AttnParams p, const FwdOut o) {
  constexpr int kRows = 128 * RB;  // rows of the CTA
  constexpr int S = kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = smem_raw + smem_align_offset(smem_raw);
  T* Qs = reinterpret_cast<T*>(base);
  T* Ks = Qs + kRows * D;
  T* Vs = Ks + S * kBC * D;
  float* tile_bias = reinterpret_cast<float*>(Vs + S * kBC * D);  // [S][kBC]
  int* tile_pos = reinterpret_cast<int*>(tile_bias + S * kBC);      // [S][kBC]
  uint64_t* full = reinterpret_cast<uint64_t*>(tile_pos + S * kBC);
  uint64_t* empty = full + S;

  constexpr int CH = D / 8;  // 16-byte chunks per row
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wgi = warpgroup_index(), wq = warp & 3;
  const CtaWork work = CtaWork::of(p, o.num_splits);
  const int row = work.row, split = work.split, chunk = work.chunk, t = work.t;

  BlockGeo geo;
  geo.init(p, row, t);
  const int rows_total = p.group * geo.nr;
  const int row_begin = chunk * kRows;
  if (row_begin >= rows_total) return;
  const int rows_here = min(kRows, rows_total - row_begin);
  const int tiles = (geo.L + kBC - 1) / kBC;
  const int tile_begin = static_cast<int>(static_cast<int64_t>(split) * tiles / o.num_splits);
  const int tile_end = static_cast<int>(static_cast<int64_t>(split + 1) * tiles / o.num_splits);

  if (tid == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(&full[i], 128);   // the producer's threads, once their copies of the stage landed
      mbar_init(&empty[i], 256);  // the consumers' threads, once their products read the stage
    }
  }
  __syncthreads();

  if (wgi == 0) {
    // Producer: Q (with the first tile), then each tile's biases and K / V rows into the next free
    // stage. A stage is published when this thread's copies have landed (its cp.async groups lag
    // the issue by one tile) and fenced for wgmma's async proxy.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");  // 24 + 2 x 240 = 3 x 168
    if (tile_begin >= tile_end) return;
    const T* kg = static_cast<const T*>(p.k) + geo.b * p.k_stride[0] + geo.h * p.k_stride[1];
    const T* vg = static_cast<const T*>(p.v) + geo.b * p.v_stride[0] + geo.h * p.v_stride[1];
    int pos = -1;
    float b2 = -INFINITY;
    if (tid < kBC) geo.key(p, tile_begin * kBC + tid, pos, b2);
    gather_rows<T, D, kRows, 128>(p, geo, static_cast<const T*>(p.q), p.q_stride, row_begin, rows_here, Qs, tid);
    for (int n = tile_begin; n < tile_end; ++n) {
      const int i = n - tile_begin, st = i % S;
      if (i >= S) mbar_wait(&empty[st], ((i / S) - 1) & 1);
      if (tid < kBC) {
        tile_pos[st * kBC + tid] = pos;
        tile_bias[st * kBC + tid] = b2;
      }
      asm volatile("bar.sync 1, 128;\n" ::: "memory");  // the producer's threads: positions parked
      gather_kv_tile<T, D, kBC, 128>(kg, vg, p.k_stride[2], p.v_stride[2], tile_pos + st * kBC, Ks + st * kBC * D,
                                     Vs + st * kBC * D, tid, [](int r, int c) { return sw128<kBC>(r, c); });
      cp_async_commit();
      if (n + 1 < tile_end && tid < kBC) geo.key(p, (n + 1) * kBC + tid, pos, b2);
      if (i >= 1) {
        cp_async_wait_group<1>();
        fence_async_shared();
        mbar_arrive(&full[(i - 1) % S]);
      }
    }
    cp_async_wait_group<0>();
    fence_async_shared();
    mbar_arrive(&full[(tile_end - 1 - tile_begin) % S]);
    return;
  }
  // Consumers: two warpgroups of RB row blocks, with the registers the producer gave back.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  const int wg = wgi - 1;

  const float scale2 = p.scale * kLog2e;
  const int g = lane >> 2, c4 = lane & 3;
  // Causal limit per row: key column kk of tile n is masked when kk > lim - n * kBC.
  int lim[RB][2];
  causal_limits<RB>(geo, row_begin, rows_here, wg, wq, g, lim);

  const uint32_t q_addr = smem_addr(Qs), k_addr = smem_addr(Ks), v_addr = smem_addr(Vs);
  constexpr uint32_t kRowPanel = kRows * 128, kKeyPanel = kBC * 128;  // bytes of one 64-column panel

  float acc[RB][D / 2];
  float m[RB][2], l[RB][2];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[rb][i] = 0.f;
    m[rb][0] = m[rb][1] = -INFINITY;
    l[rb][0] = l[rb][1] = 0.f;
  }

  for (int n = tile_begin; n < tile_end; ++n) {
    const int i = n - tile_begin, st = i % S;
    mbar_wait(&full[st], (i / S) & 1);
    const uint32_t kt = k_addr + st * kBC * D * 2, vt = v_addr + st * kBC * D * 2;
    // S = Q K^T for every row block (one commit group each). Ping-pong: the warpgroups take turns
    // to issue them (named barriers 3 and 4), so one's softmax runs under the other's products.
    // Warpgroup 0 goes first; warpgroup 1 does not hand the turn back after its last tile, so
    // every arrival is matched.
    float s[RB][kBC / 2];
    if (wg == 1 || i > 0) asm volatile("bar.sync %0, 256;\n" ::"r"(3 + wg) : "memory");
    wgmma_fence();
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
      const uint32_t row0 = (wg * RB + rb) * 64;
      wgmma_rows_by_rows<T, kBC, D>(s[rb], q_addr + row0 * 128, kRowPanel, kt, kKeyPanel);
      wgmma_commit();
    }
    if (wg == 0 || n + 1 < tile_end) asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - wg) : "memory");
    const float* bias = tile_bias + st * kBC;
    const bool need_mask = geo.tile_needs_mask((n + 1) * kBC);
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
      // Pending: S of rb..RB-1 and PV of 0..rb-1, RB groups; S of rb is the oldest.
      wgmma_wait<RB - 1>();
      wgmma_pin(s[rb]);
      // Online softmax (log2 domain) of rows g and g+8 of this warp's 16.
      float corr[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
        for (int j = 0; j < kBC / 8; ++j) {
          const float2 bb = *reinterpret_cast<const float2*>(&bias[j * 8 + 2 * c4]);
          s[rb][4 * j + 2 * hr] = fmaf(s[rb][4 * j + 2 * hr], scale2, bb.x);
          s[rb][4 * j + 2 * hr + 1] = fmaf(s[rb][4 * j + 2 * hr + 1], scale2, bb.y);
        }
      }
      // The causal mask, in a branch of its own: only the window's last tiles need it, and folded
      // into the loop above it cost every tile two instructions per score.
      if (need_mask) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int limit = lim[rb][hr] - n * kBC;
#pragma unroll
          for (int j = 0; j < kBC / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (j * 8 + 2 * c4 + e > limit) s[rb][4 * j + 2 * hr + e] = -INFINITY;
        }
      }
      bool rescale = false;
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kBC / 8; ++j) mx = fmaxf(mx, fmaxf(s[rb][4 * j + 2 * hr], s[rb][4 * j + 2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // The running max moves only when a score passes it by more than kRescaleSlack (log2
        // units; P is then at most 2^kRescaleSlack), so most tiles keep it and skip rescaling
        // the accumulator. Exact: the output and lse use the same max as the sums.
        const float m_old = m[rb][hr];
        const bool grow = mx > m_old + kRescaleSlack;  // false while both are -inf
        const float m_new = grow ? mx : m_old;
        corr[hr] = grow ? exp2f(m_old - m_new) : 1.f;  // 0 on a row's first unmasked tile
        rescale |= grow && m_old != -INFINITY;         // the accumulator is still zero before that
        m[rb][hr] = m_new;
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < kBC / 8; ++j) {
          const float p0 = exp2f(s[rb][4 * j + 2 * hr] - m_use);
          const float p1 = exp2f(s[rb][4 * j + 2 * hr + 1] - m_use);
          s[rb][4 * j + 2 * hr] = p0;
          s[rb][4 * j + 2 * hr + 1] = p1;
          rs += p0 + p1;
        }
        l[rb][hr] = l[rb][hr] * corr[hr] + rs;
      }
      if (__any_sync(0xffffffffu, rescale)) {  // warp-uniform: the rows of this warp
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            acc[rb][4 * j + 2 * hr] *= corr[hr];
            acc[rb][4 * j + 2 * hr + 1] *= corr[hr];
          }
      }
      // O += P V: P from registers, V read MN-major.
      wgmma_fragments_by_tile<T, D, kBC>(acc[rb], s[rb], vt, kKeyPanel);
      wgmma_commit();
    }
    wgmma_wait<0>();  // this thread's products have read the stage: it may be refilled
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) wgmma_pin(acc[rb]);
    mbar_arrive(&empty[st]);
  }

  // Epilogue: normalise, write lse, and out (staged through the CTA's Q rows) or the split's
  // partial result.
  asm volatile("bar.sync 2, 256;\n" ::: "memory");  // every consumer wgmma has read Q
  const int64_t rows_all = static_cast<int64_t>(p.batch) * p.q_heads * p.num_queries;
#pragma unroll
  for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float lsum = l[rb][hr];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      const float lse = lsum > 0.f ? (m[rb][hr] + log2f(lsum)) * kLn2 : -INFINITY;
      const int lr = fragment_row<RB>(wg, rb, wq, hr, g);
      const bool ok = lr < rows_here;
      const int64_t ri = ok ? geo.row_index(p, row_begin + lr) : 0;
      if (o.num_splits > 1) {
        if (ok) {
          float* dst = o.o_part + (split * rows_all + ri) * D;
#pragma unroll
          for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<float2*>(&dst[j * 8 + 2 * c4]) =
                make_float2(acc[rb][4 * j + 2 * hr] * inv, acc[rb][4 * j + 2 * hr + 1] * inv);
          if (c4 == 0) o.lse_part[split * rows_all + ri] = lse;
        }
      } else {
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
          *reinterpret_cast<uint32_t*>(&Qs[sw128<kRows>(lr, j * 8 + 2 * c4)]) =
              Mma<T>::pack(acc[rb][4 * j + 2 * hr] * inv, acc[rb][4 * j + 2 * hr + 1] * inv);
        if (ok && c4 == 0) o.lse[ri] = lse;
      }
    }
  }
  if (o.num_splits == 1) {
    __syncwarp();
    T* out = static_cast<T*>(o.out);
    // This warp's rows: 16 of each of its warpgroup's row blocks.
    for (int i = lane; i < RB * 16 * CH; i += 32) {
      const int r = i / CH, c = i % CH;
      const int lr = (wg * RB + r / 16) * 64 + wq * 16 + r % 16;
      if (lr < rows_here) {
        const int64_t ri = geo.row_index(p, row_begin + lr);
        *reinterpret_cast<uint4*>(out + ri * D + c * 8) = *reinterpret_cast<const uint4*>(&Qs[sw128<kRows>(lr, c * 8)]);
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

template <typename T, int D, int RB>
void launch_fwd_rows(const AttnParams& p, const FwdOut& o, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<D, RB>();
  const dim3 grid = CtaWork::grid(p, o.num_splits);
  allow_dynamic_smem<fwd_kernel<T, D, RB>>(smem);
  fwd_kernel<T, D, RB><<<grid, kThreads, smem, stream>>>(p, o);
}

template <typename T, int D>
void launch_fwd(const AttnParams& p, const FwdOut& o, cudaStream_t stream) {
  if (p.row_blocks == 2)
    launch_fwd_rows<T, D, 2>(p, o, stream);
  else
    launch_fwd_rows<T, D, 1>(p, o, stream);
  if (o.num_splits > 1) {
    const int64_t rows_all = static_cast<int64_t>(p.batch) * p.q_heads * p.num_queries;
    merge_splits_kernel<T, D><<<static_cast<unsigned>((rows_all + 7) / 8), 256, 0, stream>>>(o, rows_all);
  }
}

}  // namespace

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
