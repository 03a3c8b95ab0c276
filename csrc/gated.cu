// Flamingo's tanh-gated residual x + tanh(gate) * y: the gate is read on the device, 16-byte
// vectors where the pointers allow; the backward writes dy and one partial sum of dout * y per
// block (reduced by the caller: deterministic, no atomics).
#include "vlk.cuh"

namespace vlk {
namespace {

constexpr int THREADS = 256, PER_THREAD = 8, BLOCK = THREADS * PER_THREAD;

__device__ __forceinline__ float tanh_gate(const float* g) { return tanhf(*g); }

template <typename T>
__device__ __forceinline__ void load8(float* out, const T* p, int64_t i, int64_t n, bool vec) {
  if (vec && i + PER_THREAD <= n) {
    alignas(16) T tmp[PER_THREAD];  // written as uint4
#pragma unroll
    for (int j = 0; j < PER_THREAD; j += 16 / int(sizeof(T)))
      *reinterpret_cast<uint4*>(tmp + j) = *reinterpret_cast<const uint4*>(p + i + j);
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) out[j] = to_f(tmp[j]);
  } else {
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) out[j] = i + j < n ? to_f(p[i + j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float* x, int64_t i, int64_t n) {
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j)
    if (i + j < n) p[i + j] = from_f<T>(x[j]);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) gated_fwd_kernel(GatedArgs a, bool vec) {
  const float t = tanh_gate(a.gate);
  const int64_t i = (int64_t(blockIdx.x) * THREADS + threadIdx.x) * PER_THREAD;
  float x[PER_THREAD], y[PER_THREAD];
  load8(x, cptr<T>(a.x), i, a.n, vec);
  load8(y, cptr<T>(a.y), i, a.n, vec);
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) x[j] += t * y[j];
  store8(static_cast<T*>(a.out), x, i, a.n);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) gated_bwd_kernel(GatedArgs a, bool vec) {
  VLK_SMEM(smem);
  float* warp_sums = reinterpret_cast<float*>(smem);
  const float t = tanh_gate(a.gate);
  const int64_t i = (int64_t(blockIdx.x) * THREADS + threadIdx.x) * PER_THREAD;
  float d[PER_THREAD], y[PER_THREAD], acc = 0.f;
  load8(d, cptr<T>(a.grad_out), i, a.n, vec);
  load8(y, cptr<T>(a.y), i, a.n, vec);
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) {
    acc += d[j] * y[j];
    d[j] *= t;
  }
  store8(static_cast<T*>(a.dy), d, i, a.n);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL, acc, off);
  if (lane_id() == 0) warp_sums[warp_id()] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) s += warp_sums[w];
    a.partial[blockIdx.x] = s;
  }
}

template <typename T>
const char* run(const GatedArgs& a, void* stream, bool forward) {
  const void* second = forward ? a.x : a.grad_out;
  const bool vec = reinterpret_cast<uintptr_t>(a.y) % 16 == 0 && reinterpret_cast<uintptr_t>(second) % 16 == 0;
  const dim3 grid(unsigned(gated_blocks(a.n)));
  if (forward) {
    auto kernel = gated_fwd_kernel<T>;
    VLK_LAUNCH(kernel, grid, dim3(THREADS), 0, stream, a, vec);
  } else {
    auto kernel = gated_bwd_kernel<T>;
    VLK_LAUNCH(kernel, grid, dim3(THREADS), THREADS / 32 * 4, stream, a, vec);
  }
  VLK_CHECK_LAUNCH();
}

}  // namespace

int64_t gated_blocks(int64_t n) { return (n + BLOCK - 1) / BLOCK; }
const char* gated_residual_fwd(const GatedArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return run<decltype(x)>(a, stream, true); });
}
const char* gated_residual_bwd(const GatedArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return run<decltype(x)>(a, stream, false); });
}

}  // namespace vlk
