// The span of each query row's allowed keys under a dense bool mask, over its heads: row_lo the
// first allowed key, row_hi one past the last (Lk and 0 for a row with none), int32 [B, Lq]. The
// attention kernels skip the key tiles outside it and never read the keys outside it; the mask
// still applies inside. One warp per row, lanes over the keys.
#include "vlk.cuh"

namespace vlk {
namespace {

constexpr int WARPS = 4;

__global__ void __launch_bounds__(WARPS * 32) mask_span_kernel(MaskSpanArgs a) {
  const int row = blockIdx.x * WARPS + warp_id(), b = blockIdx.y;
  if (row >= a.Lq) return;  // the whole warp: one row per warp
  int lo = a.Lk, hi = 0;
  const uint8_t* m = a.dense + b * a.smb + row * a.smm;
  for (int h = 0; h < a.H; ++h)
    for (int j = lane_id(); j < a.Lk; j += 32)
      if (m[h * a.smh + j * a.smn]) lo = min(lo, j), hi = max(hi, j + 1);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    lo = min(lo, __shfl_xor_sync(FULL, lo, off));
    hi = max(hi, __shfl_xor_sync(FULL, hi, off));
  }
  if (lane_id() == 0) a.lo[int64_t(b) * a.Lq + row] = lo, a.hi[int64_t(b) * a.Lq + row] = hi;
}

}  // namespace

const char* mask_span(const MaskSpanArgs& a, void* stream) {
  const dim3 grid(unsigned((a.Lq + WARPS - 1) / WARPS), unsigned(a.B));
  VLK_LAUNCH(mask_span_kernel, grid, dim3(WARPS * 32), 0, stream, a);
  VLK_CHECK_LAUNCH();
}

}  // namespace vlk
