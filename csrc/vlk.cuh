// Device helpers shared by the kernels: element conversion, tensor-core fragments (mma.sync
// m16n8k16, fp32 accumulation), shared-memory tile loads with 16-byte vectors, launches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "vlk.h"

#ifdef VLK_EMULATE
#include "emulate.h"
#define VLK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  vlk_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define VLK_CHECK_LAUNCH() return nullptr
#else
#include <cuda_runtime.h>
#define VLK_SMEM(name) extern __shared__ __align__(16) char name[]
#define VLK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define VLK_CHECK_LAUNCH()                               \
  do {                                                   \
    cudaError_t err_ = cudaGetLastError();               \
    return err_ == cudaSuccess ? nullptr : cudaGetErrorString(err_); \
  } while (0)
#endif

namespace vlk {

constexpr unsigned FULL = 0xffffffffu;
constexpr float NEG_INF = -__builtin_huge_valf();
constexpr float POS_INF = __builtin_huge_valf();

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Sum / max over the 4 lanes of a quad (the lanes that hold one row of a C fragment).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(FULL, x, 1);
  return x + __shfl_xor_sync(FULL, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(FULL, x, 1));
  return fmaxf(x, __shfl_xor_sync(FULL, x, 2));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core fragments of mma.sync.m16n8k16 (PTX ISA, "matrix fragments for mma.m16n8k16"),
// with g = lane / 4 and t = lane % 4:
//   A 16x16: element i at row g + 8 * ((i >> 1) & 1), column 2t + (i & 1) + 8 * (i >> 2)
//   B 16x8:  element i at k 2t + (i & 1) + 8 * (i >> 1), column g
//   C 16x8:  element e at row g + 8 * (e >> 1), column 2t + (e & 1)   (fp32)
// Half types pack two elements per 32-bit register. fp32 (exact products, as the reference)
// keeps whole rows of A and columns of B per lane and multiplies with FMAs.
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return uint32_t(a) | (uint32_t(b) << 16);
}

template <typename T>
__device__ __forceinline__ uint32_t ld2(const T* p) {  // two adjacent elements, 4-byte aligned
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
struct Mma {  // __half, __nv_bfloat16
  struct A {
    uint32_t r[4];
  };
  struct B {
    uint32_t r[2];
  };

  // A[i][k] = s[(row0 + i) * ld + k0 + k]
  static __device__ __forceinline__ void load_a(A& a, const T* s, int ld, int row0, int k0) {
    int g = lane_id() >> 2, t = lane_id() & 3;
    const T* p = s + (row0 + g) * ld + k0 + 2 * t;
    a.r[0] = ld2(p);
    a.r[1] = ld2(p + 8 * ld);
    a.r[2] = ld2(p + 8);
    a.r[3] = ld2(p + 8 * ld + 8);
  }
  // B[k][n] = s[(n0 + n) * ld + k0 + k]: the rows of s are the columns of B (K in Q K^T)
  static __device__ __forceinline__ void load_b_nk(B& b, const T* s, int ld, int n0, int k0) {
    int g = lane_id() >> 2, t = lane_id() & 3;
    const T* p = s + (n0 + g) * ld + k0 + 2 * t;
    b.r[0] = ld2(p);
    b.r[1] = ld2(p + 8);
  }
  // B[k][n] = s[(k0 + k) * ld + n0 + n]: the rows of s are the rows of B (V in P V)
  static __device__ __forceinline__ void load_b_kn(B& b, const T* s, int ld, int k0, int n0) {
    int g = lane_id() >> 2, t = lane_id() & 3;
    const T* p = s + (k0 + 2 * t) * ld + n0 + g;
    b.r[0] = pack2(p[0], p[ld]);
    b.r[1] = pack2(p[8 * ld], p[9 * ld]);
  }
  // A from two C fragments (columns [0, 8) and [8, 16)), rounded to T
  static __device__ __forceinline__ void a_from_c(A& a, const float* c0, const float* c1) {
    a.r[0] = pack2(from_f<T>(c0[0]), from_f<T>(c0[1]));
    a.r[1] = pack2(from_f<T>(c0[2]), from_f<T>(c0[3]));
    a.r[2] = pack2(from_f<T>(c1[0]), from_f<T>(c1[1]));
    a.r[3] = pack2(from_f<T>(c1[2]), from_f<T>(c1[3]));
  }
  static __device__ __forceinline__ void mma(float* c, const A& a, const B& b);
};

#ifdef VLK_EMULATE
template <typename T>
__device__ __forceinline__ void Mma<T>::mma(float* c, const A& a, const B& b) {
  uint16_t a8[8], b4[4];
  for (int i = 0; i < 4; ++i) memcpy(a8 + 2 * i, &a.r[i], 4);
  for (int i = 0; i < 2; ++i) memcpy(b4 + 2 * i, &b.r[i], 4);
  vlk_emu::mma_16816(c, a8, b4, [](uint16_t bits) {
    T x;
    memcpy(&x, &bits, 2);
    return to_f<T>(x);
  });
}
#else
template <>
__device__ __forceinline__ void Mma<__half>::mma(float* c, const A& a, const B& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}
template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>::mma(float* c, const A& a, const B& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
}
#endif

template <>
struct Mma<float> {
  struct A {
    float x[2][16];  // rows g, g + 8
  };
  struct B {
    float x[2][16];  // columns 2t, 2t + 1
  };
  static __device__ __forceinline__ void load_a(A& a, const float* s, int ld, int row0, int k0) {
    int g = lane_id() >> 2;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int k = 0; k < 16; k += 4) {
        float4 v = *reinterpret_cast<const float4*>(s + (row0 + g + 8 * r) * ld + k0 + k);
        a.x[r][k] = v.x, a.x[r][k + 1] = v.y, a.x[r][k + 2] = v.z, a.x[r][k + 3] = v.w;
      }
  }
  static __device__ __forceinline__ void load_b_nk(B& b, const float* s, int ld, int n0, int k0) {
    int t = lane_id() & 3;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int k = 0; k < 16; k += 4) {
        float4 v = *reinterpret_cast<const float4*>(s + (n0 + 2 * t + j) * ld + k0 + k);
        b.x[j][k] = v.x, b.x[j][k + 1] = v.y, b.x[j][k + 2] = v.z, b.x[j][k + 3] = v.w;
      }
  }
  static __device__ __forceinline__ void load_b_kn(B& b, const float* s, int ld, int k0, int n0) {
    int t = lane_id() & 3;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      float2 v = *reinterpret_cast<const float2*>(s + (k0 + k) * ld + n0 + 2 * t);
      b.x[0][k] = v.x, b.x[1][k] = v.y;
    }
  }
  // Rows g and g + 8 of the 16x16 block held by the quad: gathered with shuffles.
  static __device__ __forceinline__ void a_from_c(A& a, const float* c0, const float* c1) {
    int base = lane_id() & ~3;
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        a.x[r][2 * s] = __shfl_sync(FULL, c0[2 * r], base | s);
        a.x[r][2 * s + 1] = __shfl_sync(FULL, c0[2 * r + 1], base | s);
        a.x[r][8 + 2 * s] = __shfl_sync(FULL, c1[2 * r], base | s);
        a.x[r][9 + 2 * s] = __shfl_sync(FULL, c1[2 * r + 1], base | s);
      }
  }
  static __device__ __forceinline__ void mma(float* c, const A& a, const B& b) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int k = 0; k < 16; ++k) c[e] = fmaf(a.x[e >> 1][k], b.x[e & 1][k], c[e]);
  }
};

// Element e of a C fragment: its row and column within the 16x8 tile.
__device__ __forceinline__ int c_row(int e) { return (lane_id() >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int c_col(int e) { return 2 * (lane_id() & 3) + (e & 1); }

// Two adjacent elements of a C fragment row to a strided matrix, inside rows_valid x cols_valid.
template <typename T>
__device__ __forceinline__ void store_frag(T* base, int64_t row_stride, int64_t col_stride, int row,
                                           int col, int rows_valid, int cols_valid, float x0, float x1) {
  if (row >= rows_valid) return;
  if (col < cols_valid) base[row * row_stride + col * col_stride] = from_f<T>(x0);
  if (col + 1 < cols_valid) base[row * row_stride + (col + 1) * col_stride] = from_f<T>(x1);
}

// S[16 x 8 * NJ] += rows [r0, r0 + 16) of As times the rows [0, 8 * NJ) of Bs transposed (both [.][DP])
template <typename T, int DP, int NJ>
__device__ __forceinline__ void mm_nt(float (*s)[4], const T* As, const T* Bs, int ld, int r0) {
  using M = Mma<T>;
#pragma unroll
  for (int kk = 0; kk < DP; kk += 16) {
    typename M::A a;
    M::load_a(a, As, ld, r0, kk);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      typename M::B bf;
      M::load_b_nk(bf, Bs, ld, j * 8, kk);
      M::mma(s[j], a, bf);
    }
  }
}

// O[16 x DP] += P[16 x 16 * NK] (C fragments) times the rows [0, 16 * NK) of Bs [.][DP]
template <typename T, int DP, int NK>
__device__ __forceinline__ void mm_pv(float (*o)[4], float (*p)[4], const T* Bs, int ld) {
  using M = Mma<T>;
#pragma unroll
  for (int kk = 0; kk < NK; ++kk) {
    typename M::A a;
    M::a_from_c(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int dj = 0; dj < DP / 8; ++dj) {
      typename M::B bf;
      M::load_b_kn(bf, Bs, ld, kk * 16, dj * 8);
      M::mma(o[dj], a, bf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile loads: rows [0, nrows) x columns [0, ncols) of a strided global matrix into shared memory
// (row stride ld), zero outside rows [rows_from, rows_valid) x cols_valid (rows outside are not read). 16-byte vectors when `vec` (unit column
// stride, 16-byte aligned rows, cols_valid a multiple of the vector): each thread issues its
// loads of the tile before using any, so several are in flight.
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void load_tile(T* s, int ld, const T* g, int64_t row_stride, int64_t col_stride,
                                          int nrows, int ncols, int rows_valid, int cols_valid, bool vec,
                                          int rows_from = 0) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    int per_row = ncols / V;
    for (int i = threadIdx.x; i < nrows * per_row; i += blockDim.x) {
      int r = i / per_row, c = (i % per_row) * V;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r >= rows_from && r < rows_valid && c < cols_valid)
        val = *reinterpret_cast<const uint4*>(g + r * row_stride + c);
      *reinterpret_cast<uint4*>(s + r * ld + c) = val;
    }
  } else {
    for (int i = threadIdx.x; i < nrows * ncols; i += blockDim.x) {
      int r = i / ncols, c = i % ncols;
      const bool ok = r >= rows_from && r < rows_valid && c < cols_valid;
      s[r * ld + c] = ok ? g[r * row_stride + c * col_stride] : from_f<T>(0.f);
    }
  }
}

// Whether load_tile may use 16-byte vectors for a matrix with these strides.
template <typename T>
__host__ __device__ inline bool vec_ok(const void* p, int64_t row_stride, int64_t col_stride, int cols_valid) {
  constexpr int V = 16 / sizeof(T);
  return col_stride == 1 && reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride % V == 0 && cols_valid % V == 0;
}

template <typename T>
__device__ __forceinline__ const T* cptr(const void* p) {
  return static_cast<const T*>(p);
}

// f(T{}) with T the element type of dt: the one dtype switch of the launchers.
template <typename F>
const char* with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F16:
      return f(__half{});
    case DType::BF16:
      return f(__nv_bfloat16{});
    default:
      return f(0.f);
  }
}

__host__ __device__ inline int cdiv(int a, int b) { return (a + b - 1) / b; }

}  // namespace vlk
