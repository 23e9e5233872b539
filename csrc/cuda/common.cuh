// Device helpers shared by the SparseK CUDA kernels (sm_90a): fp16 / bf16 packing, cp.async
// gathers, wgmma's swizzled shared-memory layouts and warp reductions.
// Plain CUDA, no torch: the kernels compile alone with nvcc (see NOTES.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace sparsek_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// fp16 / bf16 as the mma operand type; pack() turns two floats into one 32-bit A/B register
// (first value in the low half, which is the lower column of the fragment).
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The swizzled tiles want 1024-byte alignment (wgmma's 128-byte swizzle atom) and dynamic shared
// memory promises less: each kernel asks for kSmemAlignSlack bytes more and starts its tiles
// smem_align_offset(raw) bytes into its raw buffer.
constexpr int kSmemAlignSlack = 1024;
__device__ __forceinline__ uint32_t smem_align_offset(const void* raw) {
  return (1024 - (smem_addr(raw) & 1023)) & 1023;
}

// Lets Kernel take `bytes` of dynamic shared memory. The attribute holds for the process, and a
// cudaFuncSetAttribute per launch is a driver call on the host path before the forward kernel
// (the host issues the selection's kernels slower than the GPU runs them), so it is set once per
// kernel and device (the first 64 devices; any later one sets it every launch).
template <auto Kernel>
inline cudaError_t allow_dynamic_smem(size_t bytes) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = 64;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// The thread's warpgroup (threads / 128), broadcast from lane 0 so that the compiler knows it is
// warp-uniform: the wgmma descriptors derived from it then live in uniform registers instead of
// being moved there for every wgmma (193 R2UR per backward tile before).
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) >> 7, 0); }

// 16-byte global -> shared copy; src_bytes = 0 writes zeros (padding rows and keys).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// Waits until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Shared-memory mbarriers (CTA scope): init with the arrivals a phase takes; arrive (release);
// wait until the phase of the given parity has completed (acquire).
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT_%=;\n}\n" ::"r"(
          smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later reads
// by the async proxy (wgmma operands); a barrier after it publishes them to the other threads.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Element offset of (row, col) in a tile of R rows as wgmma reads it with the 128-byte swizzle:
// col / 64 picks a panel of R x 64 elements, the 16-byte chunk is xor-ed by row % 8 (tiles
// 1024-byte aligned). The same layout serves K-major and MN-major operands.
template <int R>
__device__ __forceinline__ int sw128(int row, int col) {
  return (col >> 6) * (R * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Inclusive prefix sum over the warp's lanes (lane i gets the sum of lanes 0..i); all lanes take part.
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}
__device__ __forceinline__ int warp_sum(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace sparsek_cuda
