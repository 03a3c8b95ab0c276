// Masked attention's kernels and launchers, forward and backward, on tensor cores (mma.sync
// m16n8k16, fp32 accumulation; fp32 inputs use exact FMA products). Semantics are those of
// vlkernels/attention/ (the arguments in args.py, the mask as masks.MaskArgs): per query row an
// allowed key interval [lo, hi) from the analytic mask (row_bounds) and a dense bool mask on top,
// key tiles outside the union of a block's intervals skipped and keys outside it never read (so a
// key no row may attend, NaN after the valid length of a KV buffer, reaches no result), rows with
// nothing to attend give 0 and lse = +inf, lse in log2 units.
//
// Each warp owns 16 rows of a tile (queries forward and for dq, keys for dk/dv); the tiles it
// multiplies sit in shared memory, row stride LD = DP + pad (DP: the head dim rounded up to 32, 64,
// 128 or 256; padded columns are zero). Tile sizes are fixed per (dtype, DP) in Cfg.
#pragma once
#include "vlk.cuh"

namespace vlk {

// What attention_launch runs.
enum class Pass { BWD, FWD, POSITION_GRAD };

namespace {

template <typename T, int DP>
struct Cfg {
  static constexpr int ROW_BYTES = int(sizeof(T)) * DP;
  static constexpr int LD = DP + 16 / int(sizeof(T));
  // forward: BM queries x BN keys
  static constexpr int FWD_BM = 64, FWD_BN = ROW_BYTES >= 512 ? 32 : 64;
  static_assert(SPLIT_KEYS % FWD_BN == 0, "a run of split keys holds whole key tiles");
  // dq: BM queries x BN keys; dk/dv: BN keys (the warps' rows) x BM queries
  static constexpr int DQ_BM = ROW_BYTES >= 1024 ? 32 : 64, DQ_BN = ROW_BYTES >= 512 ? 32 : 64;
  static constexpr int KV_BN = ROW_BYTES >= 1024 ? 32 : 64, KV_BM = ROW_BYTES >= 512 ? 32 : 64;
  static constexpr int smem(int tile_rows, int small_rows) {
    return tile_rows * LD * int(sizeof(T)) + small_rows * 4 * 4;
  }
};

struct VecFlags {
  bool q, k, v, o, dout;
};

// Allowed key interval [lo, hi) of query `row` of batch b (empty rows: [Lk, 0)): the C++ statement
// of masks.MaskArgs.intervals (vlkernels/masks.py; _row_bounds in vlkernels/attention/triton.py).
__device__ __forceinline__ void row_bounds(const MaskArgs& m, int64_t b, int row, int Lq, int Lk, int& lo,
                                           int& hi) {
  lo = 0;
  hi = Lk;
  if (m.causal) hi = min(hi, row + (Lk - Lq) + 1);
  if (m.key_lengths) hi = min(hi, m.key_lengths[b]);
  const int nq = m.qformer_queries;
  if (m.qformer_mode == QFORMER_MULTIMODAL_CAUSAL) hi = min(hi, row < nq ? nq : max(row + 1, nq));
  if (m.qformer_mode == QFORMER_UNIMODAL) {
    hi = min(hi, row < nq ? nq : Lk);
    lo = max(lo, row < nq ? 0 : nq);
  }
  if (m.prefix_lengths) hi = min(hi, max(m.prefix_lengths[b], row + 1));
  if (m.media_mode != MEDIA_NONE) {
    int t = row < Lq ? m.text_to_media[b * m.stb + int64_t(row) * m.stm] : 0;
    hi = min(hi, t * m.latents_per_media);
    if (m.media_mode == MEDIA_IMMEDIATE) lo = max(lo, (t - 1) * m.latents_per_media);
  }
  if (m.window > 0) lo = max(lo, row + (Lk - Lq) - m.window + 1);
  if (m.row_lo && row < Lq) {  // per-row bounds: a document's run, a dense mask's span
    lo = max(lo, m.row_lo[b * Lq + row]);
    hi = min(hi, m.row_hi[b * Lq + row]);
  }
  if (row >= Lq || lo >= hi) {
    lo = Lk;
    hi = 0;
  }
}

__device__ __forceinline__ bool allowed(const MaskArgs& m, int64_t b, int h, int row, int col, int lo, int hi) {
  bool ok = col >= lo && col < hi;
  if (ok && m.dense) ok = m.dense[b * m.smb + h * m.smh + int64_t(row) * m.smm + int64_t(col) * m.smn] != 0;
  return ok;
}

// The position bias (natural units) of query `row` and key `col` of (b, h) and what its gradient
// is reduced by (`by`): T5, the element's bucket; ALiBi, the bias's derivative in the slope,
// -|i - j| (vlkernels/bias.py, _position in vlkernels/attention/triton.py).
__device__ __forceinline__ float position(const AttnArgs& a, int64_t b, int h, int row, int col, float& by) {
  const MaskArgs& m = a.mask;
  const int rel = col - (row + (a.Lk - a.Lq) + m.pos_shift);  // key - query position
  if (m.pos_buckets) {
    const int c = m.pos_buckets[min(max(rel, -m.pos_md), m.pos_md) + m.pos_md];
    by = float(c);
    return m.pos[h * m.spos0 + c * m.spos1];
  }
  by = -fabsf(float(rel));
  return m.pos[b * m.spos0 + h * m.spos1] * by;
}

// A score in log2 units from q·k of query `row` and key `col`: scaled, then capped (softcap > 0:
// softcap * tanh(s / softcap), Gemma 2), then + the position bias; dcap = the cap's derivative (1
// without a cap). X: the kernel was instantiated for soft-capping, dropout or a position bias
// (extras()); without, none of them is compiled in.
template <bool X>
__device__ __forceinline__ float score(const AttnArgs& a, float qk, float& dcap, int64_t b, int h, int row,
                                       int col) {
  float s;
  if (X && a.softcap > 0.f) {
    const float t = tanhf(qk * a.scale / a.softcap);
    dcap = 1.f - t * t;
    s = t * a.softcap;
  } else {
    dcap = 1.f;
    s = qk * a.scale;
  }
  if (X && a.mask.pos) {
    float by;
    s += position(a, b, h, row, col, by);
  }
  return s * 1.4426950408889634f;
}

// Philox-4x32-10's first output word (as triton.language.philox and vlkernels/attention/dropout.py).
__device__ __forceinline__ uint32_t philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = uint64_t(0xCD9E8D57u) * c2, p2 = uint64_t(0xD2511F53u) * c0;
    c0 = uint32_t(p0 >> 32) ^ c1 ^ k0;
    c2 = uint32_t(p2 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p0);
    c3 = uint32_t(p2);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// The dropout seed of a call (read once per thread; 0 without dropout).
template <bool X>
__device__ __forceinline__ uint64_t dropout_seed(const AttnArgs& a) {
  return X && a.dropout ? uint64_t(*a.seed) : 0;
}

// Attention dropout's keep indicator of probability (b, h, row, col): 1 kept, 0 dropped, 1 off.
template <bool X>
__device__ __forceinline__ float kept(const AttnArgs& a, uint64_t seed, int64_t b, int h, int row, int col) {
  if (!X || !a.dropout) return 1.f;
  const uint32_t r = philox(seed, uint32_t(col), uint32_t(row), uint32_t(b * a.H + h), 0u);
  return int(r >> 8) >= a.dropout_threshold ? 1.f : 0.f;
}

// Dropout's 1 / (1 - p) (1 off). It multiplies fp32 values (the output, dV, dP), never
// probabilities about to be rounded to 16 bits for a GEMM: there the row maximum of P (1 before
// normalisation) would round the same way in every row, bf16's 1 / 0.9 being 1.109, a bias of
// -0.16% in the output.
template <bool X>
__device__ __forceinline__ float rescale(const AttnArgs& a) {
  return X && a.dropout ? a.dropout_scale : 1.f;
}

// Attention dropout's factor of probability (b, h, row, col) for fp32 arithmetic: 1 / (1 - p)
// kept, 0 dropped, 1 off.
template <bool X>
__device__ __forceinline__ float keep(const AttnArgs& a, uint64_t seed, int64_t b, int h, int row, int col) {
  return kept<X>(a, seed, b, h, row, col) * rescale<X>(a);
}

// Per-row mask bounds (and optionally two per-row fp32 values) of the BM rows starting at m0,
// written to shared memory by the first BM threads.
__device__ __forceinline__ void tile_rows(const AttnArgs& a, int64_t b, int h, int m0, int BM, int* lo_s,
                                          int* hi_s, float* lse_s, float* delta_s) {
  int i = threadIdx.x;
  if (i < BM) {
    int row = m0 + i;
    row_bounds(a.mask, b, row, a.Lq, a.Lk, lo_s[i], hi_s[i]);
    const int64_t at = (b * a.H + h) * a.Lq + row;
    if (lse_s) lse_s[i] = row < a.Lq ? a.lse[at] : 0.f;
    if (delta_s) delta_s[i] = row < a.Lq ? a.delta[at] : 0.f;
  }
}

// Union of the intervals of rows [r0, r0 + n) (read from shared memory).
__device__ __forceinline__ void range_of(const int* lo_s, const int* hi_s, int r0, int n, int& lo, int& hi) {
  lo = INT32_MAX;
  hi = 0;
  for (int i = r0; i < r0 + n; ++i) {
    lo = min(lo, lo_s[i]);
    hi = max(hi, hi_s[i]);
  }
}

template <typename T, int DP, bool X>
__global__ void __launch_bounds__(128) attn_fwd_kernel(AttnArgs a, VecFlags vec) {
  using C = Cfg<T, DP>;
  const uint64_t seed = dropout_seed<X>(a);
  constexpr int BM = C::FWD_BM, BN = C::FWD_BN, LD = C::LD;
  VLK_SMEM(smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + BM * LD;
  T* Vs = Ks + BN * LD;
  int* lo_s = reinterpret_cast<int*>(Vs + BN * LD);
  int* hi_s = lo_s + BM;

  const int tiles_m = (a.Lq + BM - 1) / BM, split = blockIdx.x / tiles_m;
  const int m0 = (blockIdx.x % tiles_m) * BM, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int hk = h / (a.H / a.Hk);
  const int k_lo = a.splits > 1 ? split * a.keys_per_split : 0;  // this program's keys
  const int k_hi = a.splits > 1 ? k_lo + a.keys_per_split : a.Lk;
  const T* q = cptr<T>(a.q) + b * a.sq[0] + h * a.sq[1] + m0 * a.sq[2];
  const T* k = cptr<T>(a.k) + b * a.sk[0] + hk * a.sk[1];
  const T* v = cptr<T>(a.v) + b * a.sv[0] + hk * a.sv[1];
  load_tile(Qs, LD, q, a.sq[2], a.sq[3], BM, DP, a.Lq - m0, a.D, vec.q);
  tile_rows(a, b, h, m0, BM, lo_s, hi_s, nullptr, nullptr);
  __syncthreads();

  const int r0 = warp_id() * 16, g = lane_id() >> 2;
  int blo, bhi, wlo, whi;
  range_of(lo_s, hi_s, 0, BM, blo, bhi);
  range_of(lo_s, hi_s, r0, 16, wlo, whi);
  const int lo[2] = {lo_s[r0 + g], lo_s[r0 + g + 8]}, hi[2] = {hi_s[r0 + g], hi_s[r0 + g + 8]};
  float m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f};
  float acc[DP / 8][4];
#pragma unroll
  for (int dj = 0; dj < DP / 8; ++dj) acc[dj][0] = acc[dj][1] = acc[dj][2] = acc[dj][3] = 0.f;

  for (int n0 = max((blo / BN) * BN, k_lo); n0 < min(bhi, k_hi); n0 += BN) {
    __syncthreads();
    load_tile(Ks, LD, k + n0 * a.sk[2], a.sk[2], a.sk[3], BN, DP, bhi - n0, a.D, vec.k, blo - n0);
    load_tile(Vs, LD, v + n0 * a.sv[2], a.sv[2], a.sv[3], BN, DP, bhi - n0, a.D, vec.v, blo - n0);
    __syncthreads();
    if (n0 >= whi || n0 + BN <= wlo) continue;  // nothing of this tile for this warp's rows

    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    mm_nt<T, DP, BN / 8>(s, Qs, Ks, LD, r0);

    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, col = n0 + j * 8 + c_col(e);
        const int row = m0 + r0 + c_row(e);
        const bool ok = allowed(a.mask, b, h, row, col, lo[r], hi[r]);
        float dcap = 1.f;  // (masked elements: score is not called)
        s[j][e] = ok ? score<X>(a, s[j][e], dcap, b, h, row, col) : NEG_INF;
        mx[r] = fmaxf(mx[r], s[j][e]);
      }
    float m_safe[2], alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(mx[r]));
      m_safe[r] = m_new == NEG_INF ? 0.f : m_new;
      alpha[r] = exp2f(m_i[r] - m_safe[r]);
      m_i[r] = m_new;
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m_safe[e >> 1]);
        rs[e >> 1] += s[j][e];
        s[j][e] *= kept<X>(a, seed, b, h, m0 + r0 + c_row(e), n0 + j * 8 + c_col(e));  // after the sum: dropout
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_i[r] = l_i[r] * alpha[r] + quad_sum(rs[r]);
#pragma unroll
    for (int dj = 0; dj < DP / 8; ++dj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[dj][e] *= alpha[e >> 1];
    mm_pv<T, DP, BN / 16>(acc, s, Vs, LD);
  }

  const int64_t rows0 = (int64_t(split) * a.B + b) * a.H + h;  // split 0 is the output itself
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    inv[r] = l_i[r] > 0.f ? rescale<X>(a) / l_i[r] : 0.f;
    const int row = m0 + r0 + g + 8 * r;
    const float empty = a.splits > 1 ? NEG_INF : POS_INF;  // a split without keys weighs 0
    float* lse = a.splits > 1 ? a.lse_partial : a.lse;
    if ((lane_id() & 3) == 0 && row < a.Lq) lse[rows0 * a.Lq + row] = l_i[r] > 0.f ? m_i[r] + log2f(l_i[r]) : empty;
  }
  T* o = static_cast<T*>(a.o) + b * a.so[0] + h * a.so[1] + m0 * a.so[2];
  float* op = a.splits > 1 ? a.o_partial + (rows0 * a.Lq + m0) * a.D : nullptr;
#pragma unroll
  for (int dj = 0; dj < DP / 8; ++dj)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float x0 = acc[dj][2 * r] * inv[r], x1 = acc[dj][2 * r + 1] * inv[r];
      if (a.splits > 1)
        store_frag(op, a.D, 1, r0 + g + 8 * r, dj * 8 + c_col(0), a.Lq - m0, a.D, x0, x1);
      else
        store_frag(o, a.so[2], a.so[3], r0 + g + 8 * r, dj * 8 + c_col(0), a.Lq - m0, a.D, x0, x1);
    }
}

// Flash-decoding's second pass: each thread combines the `splits` partial outputs and lse of one
// query row (b, h, i) into o and lse; a row with no key in any split gets 0 and lse +inf.
template <typename T>
__global__ void __launch_bounds__(128) attn_combine_kernel(AttnArgs a) {
  const int64_t n = int64_t(a.B) * a.H * a.Lq, r = int64_t(blockIdx.x) * 128 + threadIdx.x;
  if (r >= n) return;
  const int64_t b = r / (int64_t(a.H) * a.Lq), h = (r / a.Lq) % a.H, row = r % a.Lq;
  T* o = static_cast<T*>(a.o) + b * a.so[0] + h * a.so[1] + row * a.so[2];
  float m = NEG_INF;
  for (int s = 0; s < a.splits; ++s) m = fmaxf(m, a.lse_partial[s * n + r]);
  if (m == NEG_INF) {
    for (int d = 0; d < a.D; ++d) o[d * a.so[3]] = from_f<T>(0.f);
    a.lse[r] = POS_INF;
    return;
  }
  float l = 0.f;
  for (int s = 0; s < a.splits; ++s) l += exp2f(a.lse_partial[s * n + r] - m);
  for (int d = 0; d < a.D; ++d) {
    float acc = 0.f;
    for (int s = 0; s < a.splits; ++s) acc += exp2f(a.lse_partial[s * n + r] - m) * a.o_partial[(s * n + r) * a.D + d];
    o[d * a.so[3]] = from_f<T>(acc / l);
  }
  a.lse[r] = m + log2f(l);
}

// delta[b, h, i] = sum_d out * grad_out (fp32), one warp per row.
template <typename T>
__global__ void __launch_bounds__(128) attn_delta_kernel(AttnArgs a) {
  const int row = blockIdx.x * 4 + warp_id(), h = blockIdx.y;
  const int64_t b = blockIdx.z;
  if (row >= a.Lq) return;
  const T* o = cptr<T>(a.out) + b * a.so[0] + h * a.so[1] + row * a.so[2];
  const T* d = cptr<T>(a.grad_out) + b * a.sdo[0] + h * a.sdo[1] + row * a.sdo[2];
  float acc = 0.f;
  for (int i = lane_id(); i < a.D; i += 32) acc += to_f(o[i * a.so[3]]) * to_f(d[i * a.sdo[3]]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL, acc, off);
  if (lane_id() == 0) a.delta[(b * a.H + h) * a.Lq + row] = acc;
}

// A backward kernel's shared memory: the Q and dO tiles [BM, LD], the K and V tiles [BN, LD], per
// query row lo, hi (int) and lse, delta (float) [BM] each (Cfg::smem(2 * BM + 2 * BN, BM)), then
// `rest` (the position gradient's per-warp sums).
template <typename T>
struct BwdSmem {
  T *Qs, *Os, *Ks, *Vs;
  int *lo_s, *hi_s;
  float *lse_s, *delta_s, *rest;
};

template <typename T>
__device__ __forceinline__ BwdSmem<T> bwd_smem(char* smem, int BM, int BN, int LD) {
  BwdSmem<T> s;
  s.Qs = reinterpret_cast<T*>(smem);
  s.Os = s.Qs + BM * LD;
  s.Ks = s.Os + BM * LD;
  s.Vs = s.Ks + BN * LD;
  s.lo_s = reinterpret_cast<int*>(s.Vs + BN * LD);
  s.hi_s = s.lo_s + BM;
  s.lse_s = reinterpret_cast<float*>(s.hi_s + BM);
  s.delta_s = s.lse_s + BM;
  s.rest = s.delta_s + BM;
  return s;
}

// One query tile's rows for a backward pass over key tiles (dq's, the position gradient's): the
// union of the tile's intervals (blo, bhi) and of this warp's 16 rows' (wlo, whi), this lane's two
// rows' intervals and lse, and the key and value heads' bases.
template <typename T>
struct QueryTile {
  int blo, bhi, wlo, whi, lo[2], hi[2];
  float lse[2];
  const T *k, *v;
};

// Query tile m0 of (b, h) into shared memory: Q in Qs, dO in Os, the rows' intervals, lse and
// (when delta_s) delta; then its QueryTile.
template <typename T, int DP>
__device__ __forceinline__ QueryTile<T> query_tile(const AttnArgs& a, const VecFlags& vec, T* Qs, T* Os, int* lo_s,
                                                   int* hi_s, float* lse_s, float* delta_s, int64_t b, int h,
                                                   int m0, int BM) {
  constexpr int LD = Cfg<T, DP>::LD;
  const int r0 = warp_id() * 16, g = lane_id() >> 2, hk = h / (a.H / a.Hk);
  load_tile(Qs, LD, cptr<T>(a.q) + b * a.sq[0] + h * a.sq[1] + m0 * a.sq[2], a.sq[2], a.sq[3], BM, DP, a.Lq - m0,
            a.D, vec.q);
  load_tile(Os, LD, cptr<T>(a.grad_out) + b * a.sdo[0] + h * a.sdo[1] + m0 * a.sdo[2], a.sdo[2], a.sdo[3], BM, DP,
            a.Lq - m0, a.D, vec.dout);
  tile_rows(a, b, h, m0, BM, lo_s, hi_s, lse_s, delta_s);
  __syncthreads();
  QueryTile<T> t;
  range_of(lo_s, hi_s, 0, BM, t.blo, t.bhi);
  range_of(lo_s, hi_s, r0, 16, t.wlo, t.whi);
#pragma unroll
  for (int r = 0; r < 2; ++r)
    t.lo[r] = lo_s[r0 + g + 8 * r], t.hi[r] = hi_s[r0 + g + 8 * r], t.lse[r] = lse_s[r0 + g + 8 * r];
  t.k = cptr<T>(a.k) + b * a.sk[0] + hk * a.sk[1];
  t.v = cptr<T>(a.v) + b * a.sv[0] + hk * a.sv[1];
  return t;
}

// A backward pass over key tiles (dq's, the position gradient's): key tile n0 of K and V into shared
// memory (every thread of the block), then, when this warp's 16 rows attend a key of it, their
// S = Q Kᵀ in p and dP = dO Vᵀ in dp; false (p, dp unset) when they attend none.
template <typename T, int DP, int BN>
__device__ __forceinline__ bool key_tile(float (&p)[BN / 8][4], float (&dp)[BN / 8][4], const AttnArgs& a,
                                         const VecFlags& vec, const T* Qs, const T* Os, T* Ks, T* Vs,
                                         const QueryTile<T>& t, int n0) {
  constexpr int LD = Cfg<T, DP>::LD;
  const int r0 = warp_id() * 16;
  __syncthreads();
  load_tile(Ks, LD, t.k + n0 * a.sk[2], a.sk[2], a.sk[3], BN, DP, t.bhi - n0, a.D, vec.k, t.blo - n0);
  load_tile(Vs, LD, t.v + n0 * a.sv[2], a.sv[2], a.sv[3], BN, DP, t.bhi - n0, a.D, vec.v, t.blo - n0);
  __syncthreads();
  if (n0 >= t.whi || n0 + BN <= t.wlo) return false;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) p[j][e] = dp[j][e] = 0.f;
  mm_nt<T, DP, BN / 8>(p, Qs, Ks, LD, r0);
  mm_nt<T, DP, BN / 8>(dp, Os, Vs, LD, r0);
  return true;
}

// dq of one query tile, summed over the batch entries of chunk blockIdx.z (shared queries: into
// dq_partial[chunk]; otherwise the chunk is one batch entry and dq is written directly).
template <typename T, int DP, bool X>
__global__ void __launch_bounds__(128) attn_dq_kernel(AttnArgs a, VecFlags vec) {
  using C = Cfg<T, DP>;
  const uint64_t seed = dropout_seed<X>(a);
  constexpr int BM = C::DQ_BM, BN = C::DQ_BN, LD = C::LD;
  VLK_SMEM(smem);
  const auto [Qs, Os, Ks, Vs, lo_s, hi_s, lse_s, delta_s, _] = bwd_smem<T>(smem, BM, BN, LD);

  const int m0 = blockIdx.x * BM, h = blockIdx.y, c = blockIdx.z;
  const int r0 = warp_id() * 16, g = lane_id() >> 2;
  float dq[DP / 8][4];
#pragma unroll
  for (int dj = 0; dj < DP / 8; ++dj) dq[dj][0] = dq[dj][1] = dq[dj][2] = dq[dj][3] = 0.f;

  const int b_end = min(a.B, (c + 1) * a.b_per_chunk);
  for (int64_t b = int64_t(c) * a.b_per_chunk; b < b_end; ++b) {
    __syncthreads();
    const QueryTile<T> t = query_tile<T, DP>(a, vec, Qs, Os, lo_s, hi_s, lse_s, delta_s, b, h, m0, BM);
    const float delta[2] = {delta_s[r0 + g], delta_s[r0 + g + 8]};

    for (int n0 = (t.blo / BN) * BN; n0 < t.bhi; n0 += BN) {
      float p[BN / 8][4], dp[BN / 8][4];
      if (!key_tile<T, DP, BN>(p, dp, a, vec, Qs, Os, Ks, Vs, t, n0)) continue;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, row = m0 + r0 + c_row(e), col = n0 + j * 8 + c_col(e);
          const bool ok = allowed(a.mask, b, h, row, col, t.lo[r], t.hi[r]);
          float dcap = 1.f;  // (masked elements: score is not called)
          const float pe = ok ? exp2f(score<X>(a, p[j][e], dcap, b, h, row, col) - t.lse[r]) : 0.f;
          p[j][e] = pe * dcap * (dp[j][e] * keep<X>(a, seed, b, h, row, col) - delta[r]);  // dS
        }
      mm_pv<T, DP, BN / 16>(dq, p, Ks, LD);
    }
  }
  const int rows_valid = a.Lq - m0;
  if (a.dq_partial) {
    float* out = a.dq_partial + ((int64_t(c) * a.H + h) * a.Lq + m0) * a.D;
#pragma unroll
    for (int dj = 0; dj < DP / 8; ++dj)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        store_frag(out, a.D, 1, r0 + g + 8 * r, dj * 8 + c_col(0), rows_valid, a.D, dq[dj][2 * r] * a.scale,
                   dq[dj][2 * r + 1] * a.scale);
  } else {
    T* out = static_cast<T*>(a.dq) + int64_t(c) * a.sdq[0] + h * a.sdq[1] + m0 * a.sdq[2];
#pragma unroll
    for (int dj = 0; dj < DP / 8; ++dj)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        store_frag(out, a.sdq[2], a.sdq[3], r0 + g + 8 * r, dj * 8 + c_col(0), rows_valid, a.D,
                   dq[dj][2 * r] * a.scale, dq[dj][2 * r + 1] * a.scale);
  }
}

// The position bias's gradient over one query tile of (b = blockIdx.z, h = blockIdx.y): the dq
// kernel's tiles and scores without dq, dS = P (dO V^T * Z - delta) (the bias is added after the
// cap: no cap factor) reduced by each warp in a fixed order (T5: per bucket, looping over the
// buckets between the warp's smallest and largest in the tile; ALiBi: dS * -|i - j|) into its own
// shared-memory row, the warps' rows then added in order: pos_partial[b, h, tile] (deterministic,
// no atomics). A first pass gives delta = rowsum(P dO V^T Z) and the rows' sums of P, by which P is
// renormalised (as _attn_bwd_dposition: ALiBi's distance weights would carry the rounding of the
// output and of the lse into the sum).
template <typename T, int DP>
__global__ void __launch_bounds__(128) attn_dpos_kernel(AttnArgs a, VecFlags vec) {
  using C = Cfg<T, DP>;
  const uint64_t seed = dropout_seed<true>(a);
  constexpr int BM = C::DQ_BM, BN = C::DQ_BN, LD = C::LD, WARPS = BM / 16;
  VLK_SMEM(smem);
  const auto [Qs, Os, Ks, Vs, lo_s, hi_s, lse_s, _, pos_s] = bwd_smem<T>(smem, BM, BN, LD);  // pos_s [WARPS, W]

  const int m0 = blockIdx.x * BM, h = blockIdx.y, W = a.pos_width;
  const int64_t b = blockIdx.z;
  const int r0 = warp_id() * 16;
  for (int i = threadIdx.x; i < WARPS * W; i += blockDim.x) pos_s[i] = 0.f;
  const QueryTile<T> t = query_tile<T, DP>(a, vec, Qs, Os, lo_s, hi_s, lse_s, nullptr, b, h, m0, BM);
  float* own = pos_s + warp_id() * W;
  const bool t5 = a.mask.pos_buckets != nullptr;

  float delta[2] = {0.f, 0.f}, norm[2] = {0.f, 0.f};  // first pass: sums of P dP Z and of P
  for (int n0 = (t.blo / BN) * BN; n0 < t.bhi; n0 += BN) {
    float p[BN / 8][4], dp[BN / 8][4];
    if (!key_tile<T, DP, BN>(p, dp, a, vec, Qs, Os, Ks, Vs, t, n0)) continue;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, row = m0 + r0 + c_row(e), col = n0 + j * 8 + c_col(e);
        float dcap = 1.f;
        const float pe = allowed(a.mask, b, h, row, col, t.lo[r], t.hi[r])
                             ? exp2f(score<true>(a, p[j][e], dcap, b, h, row, col) - t.lse[r])
                             : 0.f;
        delta[r] += pe * dp[j][e] * keep<true>(a, seed, b, h, row, col);
        norm[r] += pe;
      }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(norm[r]);
    norm[r] = 1.f / (total == 0.f ? 1.f : total);
    delta[r] = quad_sum(delta[r]) * norm[r];
  }

  for (int n0 = (t.blo / BN) * BN; n0 < t.bhi; n0 += BN) {
    float p[BN / 8][4], dp[BN / 8][4], by[BN / 8][4];
    if (!key_tile<T, DP, BN>(p, dp, a, vec, Qs, Os, Ks, Vs, t, n0)) continue;
    float least = 3.4e38f, most = -3.4e38f;  // the warp's buckets in this tile (T5)
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, row = m0 + r0 + c_row(e), col = n0 + j * 8 + c_col(e);
        const bool ok = allowed(a.mask, b, h, row, col, t.lo[r], t.hi[r]);
        float dcap = 1.f;
        const float pe = ok ? exp2f(score<true>(a, p[j][e], dcap, b, h, row, col) - t.lse[r]) * norm[r] : 0.f;
        p[j][e] = pe * (dp[j][e] * keep<true>(a, seed, b, h, row, col) - delta[r]);  // dS
        position(a, b, h, row, col, by[j][e]);
        if (ok) least = fminf(least, by[j][e]), most = fmaxf(most, by[j][e]);
      }
    if (t5) {
      for (int o = 16; o > 0; o >>= 1) {
        least = fminf(least, __shfl_xor_sync(FULL, least, o));
        most = fmaxf(most, __shfl_xor_sync(FULL, most, o));
      }
      const int first = least <= most ? int(least) : 1, last = least <= most ? int(most) : 0;  // none: 1 > 0
      for (int c = first; c <= last; ++c) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) sum += by[j][e] == float(c) ? p[j][e] : 0.f;
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
        if (lane_id() == 0) own[c] += sum;
      }
    } else {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sum += p[j][e] * by[j][e];
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
      if (lane_id() == 0) own[0] += sum;
    }
  }
  __syncthreads();
  float* out = a.pos_partial + ((b * a.H + h) * int64_t(gridDim.x) + blockIdx.x) * W;
  for (int c = threadIdx.x; c < W; c += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < WARPS; ++w) sum += pos_s[w * W + c];
    out[c] = sum;
  }
}

// dk, dv of one key tile (the warps' rows are keys): loops over the query heads that share it and
// over the query tiles whose allowed intervals touch it.
template <typename T, int DP, bool X>
__global__ void __launch_bounds__(128) attn_dkdv_kernel(AttnArgs a, VecFlags vec) {
  using C = Cfg<T, DP>;
  const uint64_t seed = dropout_seed<X>(a);
  constexpr int BN = C::KV_BN, BM = C::KV_BM, LD = C::LD;
  VLK_SMEM(smem);
  const auto [Qs, Os, Ks, Vs, lo_s, hi_s, lse_s, delta_s, _] = bwd_smem<T>(smem, BM, BN, LD);

  const int n0 = blockIdx.x * BN, hk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int G = a.H / a.Hk;
  const int r0 = warp_id() * 16, g = lane_id() >> 2;
  int klo = INT32_MAX, khi = 0;  // the span of every row's interval: keys outside it are not read
  for (int m0 = 0; m0 < a.Lq; m0 += BM) {
    __syncthreads();
    tile_rows(a, b, 0, m0, BM, lo_s, hi_s, nullptr, nullptr);
    __syncthreads();
    int tlo, thi;
    range_of(lo_s, hi_s, 0, BM, tlo, thi);
    klo = min(klo, tlo), khi = max(khi, thi);
  }
  load_tile(Ks, LD, cptr<T>(a.k) + b * a.sk[0] + hk * a.sk[1] + n0 * a.sk[2], a.sk[2], a.sk[3], BN, DP,
            khi - n0, a.D, vec.k, klo - n0);
  load_tile(Vs, LD, cptr<T>(a.v) + b * a.sv[0] + hk * a.sv[1] + n0 * a.sv[2], a.sv[2], a.sv[3], BN, DP,
            khi - n0, a.D, vec.v, klo - n0);
  float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
  for (int dj = 0; dj < DP / 8; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dj][e] = dv[dj][e] = 0.f;

  for (int h = hk * G; h < hk * G + G; ++h) {
    for (int m0 = 0; m0 < a.Lq; m0 += BM) {
      __syncthreads();
      tile_rows(a, b, h, m0, BM, lo_s, hi_s, lse_s, delta_s);
      const int i = threadIdx.x;
      const bool touch = i < BM && lo_s[i] < n0 + BN && hi_s[i] > n0;
      if (!__syncthreads_or(touch)) continue;
      load_tile(Qs, LD, cptr<T>(a.q) + b * a.sq[0] + h * a.sq[1] + m0 * a.sq[2], a.sq[2], a.sq[3], BM, DP,
                a.Lq - m0, a.D, vec.q);
      load_tile(Os, LD, cptr<T>(a.grad_out) + b * a.sdo[0] + h * a.sdo[1] + m0 * a.sdo[2], a.sdo[2],
                a.sdo[3], BM, DP, a.Lq - m0, a.D, vec.dout);
      __syncthreads();

      float pt[BM / 8][4], dpt[BM / 8][4];  // P^T and dP^T: rows are keys, columns queries
#pragma unroll
      for (int j = 0; j < BM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) pt[j][e] = dpt[j][e] = 0.f;
      mm_nt<T, DP, BM / 8>(pt, Ks, Qs, LD, r0);
#pragma unroll
      for (int j = 0; j < BM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + c_col(e), key = n0 + r0 + c_row(e);
          const bool ok = allowed(a.mask, b, h, m0 + qi, key, lo_s[qi], hi_s[qi]);
          float dcap = 1.f;  // (masked elements: score is not called)
          const float p = ok ? exp2f(score<X>(a, pt[j][e], dcap, b, h, m0 + qi, key) - lse_s[qi]) : 0.f;
          dpt[j][e] = p * kept<X>(a, seed, b, h, m0 + qi, key);  // P^T after dropout, for dV (rescaled once summed)
          pt[j][e] = p * dcap;                          // P^T times the cap's derivative, for dS
        }
      mm_pv<T, DP, BM / 16>(dv, dpt, Os, LD);
#pragma unroll
      for (int j = 0; j < BM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[j][e] = 0.f;
      mm_nt<T, DP, BM / 8>(dpt, Vs, Os, LD, r0);
#pragma unroll
      for (int j = 0; j < BM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + c_col(e);
          const float z = keep<X>(a, seed, b, h, m0 + qi, n0 + r0 + c_row(e));
          dpt[j][e] = pt[j][e] * (dpt[j][e] * z - delta_s[qi]);  // dS^T
        }
      mm_pv<T, DP, BM / 16>(dk, dpt, Qs, LD);
    }
  }
  T* dkp = static_cast<T*>(a.dk) + b * a.sdk[0] + hk * a.sdk[1] + n0 * a.sdk[2];
  T* dvp = static_cast<T*>(a.dv) + b * a.sdv[0] + hk * a.sdv[1] + n0 * a.sdv[2];
#pragma unroll
  for (int dj = 0; dj < DP / 8; ++dj)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + g + 8 * r, col = dj * 8 + c_col(0);
      store_frag(dkp, a.sdk[2], a.sdk[3], row, col, a.Lk - n0, a.D, dk[dj][2 * r] * a.scale,
                 dk[dj][2 * r + 1] * a.scale);
      store_frag(dvp, a.sdv[2], a.sdv[3], row, col, a.Lk - n0, a.D, dv[dj][2 * r] * rescale<X>(a),
                 dv[dj][2 * r + 1] * rescale<X>(a));
    }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <typename T>
bool vec4(const void* p, const int64_t* s, int D) {  // 4-D tensor, rows of D elements
  constexpr int V = 16 / sizeof(T);
  return vec_ok<T>(p, s[2], s[3], D) && s[0] % V == 0 && s[1] % V == 0;
}

template <typename T>
VecFlags vec_flags(const AttnArgs& a) {
  return {vec4<T>(a.q, a.sq, a.D), vec4<T>(a.k, a.sk, a.D), vec4<T>(a.v, a.sv, a.D),
          a.out && vec4<T>(a.out, a.so, a.D), a.grad_out && vec4<T>(a.grad_out, a.sdo, a.D)};
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
#ifndef VLK_EMULATE
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
#else
  (void)kernel, (void)bytes;
#endif
}

// Whether a call needs the kernels instantiated with soft-capping, dropout and a position bias
// (X = true); the others leave that code out (registers: it made dk/dv spill at head dim 128).
bool extras(const AttnArgs& a) { return a.softcap > 0.f || a.dropout || a.mask.pos; }

template <typename T, int DP, bool X>
const char* fwd(const AttnArgs& a, void* stream) {
  using C = Cfg<T, DP>;
  const int smem = C::smem(C::FWD_BM + 2 * C::FWD_BN, C::FWD_BM);
  auto kernel = attn_fwd_kernel<T, DP, X>;
  allow_smem(kernel, smem);
  dim3 grid(cdiv(a.Lq, C::FWD_BM) * a.splits, a.H, a.B);
  VLK_LAUNCH(kernel, grid, dim3(C::FWD_BM * 2), smem, stream, a, vec_flags<T>(a));
  if (a.splits > 1) {
    auto combine = attn_combine_kernel<T>;
    VLK_LAUNCH(combine, dim3(cdiv(a.B * a.H * a.Lq, 128)), dim3(128), 0, stream, a);
  }
  VLK_CHECK_LAUNCH();
}

template <typename T, int DP, bool X>
const char* bwd(const AttnArgs& a, void* stream) {
  using C = Cfg<T, DP>;
  const VecFlags vec = vec_flags<T>(a);
  auto delta = attn_delta_kernel<T>;
  auto dkdv = attn_dkdv_kernel<T, DP, X>;
  auto dq = attn_dq_kernel<T, DP, X>;
  VLK_LAUNCH(delta, dim3(cdiv(a.Lq, 4), a.H, a.B), dim3(128), 0, stream, a);
  const int smem_kv = C::smem(2 * C::KV_BN + 2 * C::KV_BM, C::KV_BM);
  allow_smem(dkdv, smem_kv);
  VLK_LAUNCH(dkdv, dim3(cdiv(a.Lk, C::KV_BN), a.Hk, a.B), dim3(C::KV_BN * 2), smem_kv,
             stream, a, vec);
  const int smem_q = C::smem(2 * C::DQ_BM + 2 * C::DQ_BN, C::DQ_BM);
  allow_smem(dq, smem_q);
  VLK_LAUNCH(dq, dim3(cdiv(a.Lq, C::DQ_BM), a.H, a.dq_chunks), dim3(C::DQ_BM * 2), smem_q,
             stream, a, vec);
  VLK_CHECK_LAUNCH();
}

template <typename T, int DP>
const char* position_grad(const AttnArgs& a, void* stream) {
  using C = Cfg<T, DP>;
  auto dpos = attn_dpos_kernel<T, DP>;
  const int smem = C::smem(2 * C::DQ_BM + 2 * C::DQ_BN, C::DQ_BM) + C::DQ_BM / 16 * a.pos_width * 4;
  allow_smem(dpos, smem);
  VLK_LAUNCH(dpos, dim3(cdiv(a.Lq, C::DQ_BM), a.H, a.B), dim3(C::DQ_BM * 2), smem, stream, a, vec_flags<T>(a));
  VLK_CHECK_LAUNCH();
}

}  // namespace

// One (dtype, padded head dim): the forward (with the flash-decoding combine), the backward, or
// the position bias's gradient, the kernels with or without soft-capping, dropout and a position
// bias as the call needs. Explicitly instantiated once per (T, DP) in attention_<dtype>_hd<DP>.cu,
// so that a parallel build compiles them side by side.
template <typename T, int DP>
const char* attention_launch(const AttnArgs& a, void* stream, Pass pass) {
  if (pass == Pass::POSITION_GRAD) return position_grad<T, DP>(a, stream);
  const bool forward = pass == Pass::FWD;
  if (extras(a)) return forward ? fwd<T, DP, true>(a, stream) : bwd<T, DP, true>(a, stream);
  return forward ? fwd<T, DP, false>(a, stream) : bwd<T, DP, false>(a, stream);
}

}  // namespace vlk
