// CPU emulation of the CUDA execution model, just enough for the kernels in csrc/ (tests and
// the host-cost benchmark only).
//
// Compiled in when VLK_EMULATE is defined (benchmarks/emulated.py builds every .cu file
// with g++ that way): each CUDA thread of a block is an OS thread, blocks run one after the
// other, __syncthreads / __syncwarp are barriers, shuffles and mma.sync exchange values through
// a per-warp scratch area. It runs the kernels' own indexing, masking, fragment layouts and
// reductions on the CPU so that CI checks them against the float64 reference; it says nothing
// about timing, memory ordering or the real PTX, which only a GPU run checks.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __launch_bounds__(...)
using std::max;
using std::min;
#define VLK_SMEM(name) char* name = vlk_emu::ctx->smem.data()

namespace vlk_emu {

struct Ctx {
  dim3 grid, block;
  std::vector<char> smem;
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<uint64_t> scratch;  // 32 x 64 words per warp
  std::atomic<int> vote{0};
};

inline Ctx* ctx = nullptr;
inline thread_local dim3 thread_idx, block_idx;

inline int flat_tid() {
  return thread_idx.x + ctx->block.x * (thread_idx.y + ctx->block.y * thread_idx.z);
}
inline int warp_of() { return flat_tid() / 32; }
inline int lane_of() { return flat_tid() % 32; }
inline void block_sync() { ctx->block_bar->arrive_and_wait(); }
inline void warp_sync() { ctx->warp_bar[warp_of()]->arrive_and_wait(); }
inline uint64_t* warp_scratch() { return ctx->scratch.data() + size_t(warp_of()) * 32 * 64; }

template <typename V>
V shfl(V v, int src) {
  static_assert(sizeof(V) <= 8);
  uint64_t* s = warp_scratch();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  s[lane_of()] = bits;
  warp_sync();
  bits = s[src & 31];
  warp_sync();
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}

// D = A (16x16) * B (16x8) + C for the fragment layout of mma.sync.m16n8k16 (see vlk.cuh):
// every lane publishes its A, B elements, then computes its own four C elements.
template <typename Elem, typename Dec>
void mma_16816(float* c, const Elem* a8, const Elem* b4, Dec decode) {
  uint64_t* s = warp_scratch();
  float* A = reinterpret_cast<float*>(s);  // 16 x 16
  float* B = A + 256;                      // 16 x 8 (k, n)
  int lane = lane_of(), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 8; ++i)
    A[(g + 8 * ((i >> 1) & 1)) * 16 + 2 * t + (i & 1) + 8 * (i >> 2)] = decode(a8[i]);
  for (int i = 0; i < 4; ++i) B[(2 * t + (i & 1) + 8 * (i >> 1)) * 8 + g] = decode(b4[i]);
  warp_sync();
  for (int e = 0; e < 4; ++e) {
    int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[r * 16 + k] * B[k * 8 + n];
    c[e] += acc;
  }
  warp_sync();
}

// With VLK_EMULATE_LAUNCHES=0 a launch returns at once: the host path of a call without its
// kernels' work (a GPU would run them), for measuring what a call costs the host.
inline bool launches_off() {
  const char* e = std::getenv("VLK_EMULATE_LAUNCHES");
  return e && e[0] == '0' && e[1] == 0;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  if (launches_off()) return;
  Ctx c;
  c.grid = grid;
  c.block = block;
  c.smem.assign(std::max<size_t>(smem, 16), 0);
  int n = block.x * block.y * block.z;
  c.block_bar = std::make_unique<std::barrier<>>(n);
  for (int w = 0; w < (n + 31) / 32; ++w) c.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  c.scratch.assign(size_t((n + 31) / 32) * 32 * 64, 0);
  ctx = &c;
  std::vector<std::thread> threads;
  for (int tid = 0; tid < n; ++tid) {
    threads.emplace_back([&, tid] {
      thread_idx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            block_idx = dim3(x, y, z);
            kernel(args...);
            block_sync();
          }
    });
  }
  for (auto& th : threads) th.join();
  ctx = nullptr;
}

}  // namespace vlk_emu

#define threadIdx (vlk_emu::thread_idx)
#define blockIdx (vlk_emu::block_idx)
#define blockDim (vlk_emu::ctx->block)
#define gridDim (vlk_emu::ctx->grid)

inline void __syncthreads() { vlk_emu::block_sync(); }
inline void __syncwarp(unsigned = 0xffffffffu) { vlk_emu::warp_sync(); }
inline int __syncthreads_or(int p) {
  auto& c = *vlk_emu::ctx;
  vlk_emu::block_sync();
  if (p) c.vote = 1;
  vlk_emu::block_sync();
  int r = c.vote;
  vlk_emu::block_sync();
  if (vlk_emu::flat_tid() == 0) c.vote = 0;
  vlk_emu::block_sync();
  return r;
}
template <typename V>
V __shfl_sync(unsigned, V v, int src) {
  return vlk_emu::shfl(v, src);
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask) {
  return vlk_emu::shfl(v, vlk_emu::lane_of() ^ mask);
}
