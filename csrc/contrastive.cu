// Tiled contrastive losses (CLIP InfoNCE with smoothing, queues and momentum distillation,
// SigLIP, BLIP-2's max over queries): the row passes of vlkernels/contrastive/ (args.py), forward (per-row
// statistics) and backward (dLoss/drows and the scale/bias sums), on tensor cores. Nothing N x N
// is allocated: each logit tile lives in registers (C fragments of mma.sync, fp32).
//
// A block owns BM = 64 rows (16 per warp) and walks the column tiles of [cols ; neg] (negatives
// start at the first tile boundary after the N columns). Similarities are computed over the
// feature dim in DK-wide shared-memory chunks; the backward block also owns a DO-wide slice of the
// feature dim of dLoss/drows (grid axis y) and recomputes the tile for it.
#include "vlk.cuh"

namespace vlk {
namespace {

constexpr int BM = 64, BN = 64, DK = 32, DO = 64, THREADS = 128;

template <typename T>
struct Smem {
  static constexpr int LDK = DK + 16 / int(sizeof(T)), LDO = DO + 16 / int(sizeof(T));
  static constexpr int fwd = (BM + BN) * LDK * int(sizeof(T));
  static constexpr int bwd = fwd + BN * LDO * int(sizeof(T));
};

struct Operand {  // a [rows, Q, D] feature matrix seen from one tile
  const void* p;
  int64_t s0, sq, sd;
  int valid, Q;
  bool vec;
};

// sim = max over (qr, qc) of R[., qr] . C[., qc] (fp32 C fragments of the warp's 16 rows x BN
// columns) and the index qr + qc of the maximum (one of QR, QC is 1).
template <typename T>
__device__ void sim_tile(float (*sim)[4], int (*arg)[4], const Operand& R, const Operand& C, int D, T* Rs, T* Cs) {
  constexpr int LDK = Smem<T>::LDK;
  const int r0 = warp_id() * 16;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) sim[j][e] = NEG_INF, arg[j][e] = 0;
  for (int qr = 0; qr < R.Q; ++qr)
    for (int qc = 0; qc < C.Q; ++qc) {
      float acc[BN / 8][4];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
      for (int d0 = 0; d0 < D; d0 += DK) {
        __syncthreads();
        load_tile(Rs, LDK, cptr<T>(R.p) + qr * R.sq + d0 * R.sd, R.s0, R.sd, BM, DK, R.valid, D - d0, R.vec);
        load_tile(Cs, LDK, cptr<T>(C.p) + qc * C.sq + d0 * C.sd, C.s0, C.sd, BN, DK, C.valid, D - d0, C.vec);
        __syncthreads();
        mm_nt<T, DK, BN / 8>(acc, Rs, Cs, LDK, r0);
      }
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (acc[j][e] > sim[j][e]) sim[j][e] = acc[j][e], arg[j][e] = qr + qc;
    }
}

template <typename T>
__host__ __device__ bool vec3(const void* p, int64_t s0, int64_t sq, int64_t sd, int D) {
  constexpr int V = 16 / sizeof(T);
  return vec_ok<T>(p, s0, sd, D) && sq % V == 0;
}

// The rows of this block and the column tile starting at n0 (negatives from n_pad on).
template <typename T>
struct Tiles {
  Operand rows, rows_m, cols;
  bool main;
  __device__ Tiles(const ContrastiveArgs& a, int m0, int n0, int n_pad) {
    rows = {cptr<T>(a.rows) + m0 * a.sr[0], a.sr[0], a.sr[1], a.sr[2], a.M - m0, a.QR,
            vec3<T>(a.rows, a.sr[0], a.sr[1], a.sr[2], a.D)};
    const void* rm = a.rows_m ? a.rows_m : a.rows;
    const int64_t* s = a.rows_m ? a.srm : a.sr;
    rows_m = {cptr<T>(rm) + m0 * s[0], s[0], s[1], s[2], a.M - m0, a.QR, vec3<T>(rm, s[0], s[1], s[2], a.D)};
    main = n0 < a.N;
    if (main)
      cols = {cptr<T>(a.cols) + n0 * a.sc[0], a.sc[0], a.sc[1], a.sc[2], a.N - n0, a.QC,
              vec3<T>(a.cols, a.sc[0], a.sc[1], a.sc[2], a.D)};
    else
      cols = {cptr<T>(a.neg) + (n0 - n_pad) * a.sneg[0], a.sneg[0], 0, a.sneg[1], a.K - (n0 - n_pad), 1,
              vec3<T>(a.neg, a.sneg[0], 0, a.sneg[1], a.D)};
  }
};

template <typename T>
__global__ void __launch_bounds__(THREADS) ctr_fwd_kernel(ContrastiveArgs a) {
  VLK_SMEM(smem);
  T* Rs = reinterpret_cast<T*>(smem);
  T* Cs = Rs + BM * Smem<T>::LDK;
  const int m0 = blockIdx.x * BM, r0 = warp_id() * 16;
  const float s = *a.scale, bias = a.bias ? *a.bias : 0.f;
  const bool distill = a.rows_m != nullptr;
  float m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f}, pos[2] = {0.f, 0.f}, tot[2] = {0.f, 0.f};
  float mm_i[2] = {NEG_INF, NEG_INF}, lm_i[2] = {0.f, 0.f}, wm_i[2] = {0.f, 0.f};
  const int n_pad = cdiv(a.N, BN) * BN;
  const int n_cols = a.kind == LOSS_CLIP ? n_pad + a.K : a.N;
  for (int n0 = 0; n0 < n_cols; n0 += BN) {
    Tiles<T> t(a, m0, n0, n_pad);
    float sim[BN / 8][4], simm[BN / 8][4];
    int arg[BN / 8][4];
    sim_tile<T>(sim, arg, t.rows, t.cols, a.D, Rs, Cs);
    if (distill) sim_tile<T>(simm, arg, t.rows_m, t.cols, a.D, Rs, Cs);
    float tile_max[2] = {NEG_INF, NEG_INF}, mtile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, row = m0 + r0 + c_row(e), col = n0 + j * 8 + c_col(e);
        const bool ok = row < a.M && col - n0 < t.cols.valid;
        const bool is_pos = t.main && a.row_off + row == a.col_off + col;
        const float logit = s * sim[j][e] + bias;
        if (a.kind == LOSS_CLIP) {
          sim[j][e] = ok ? logit : NEG_INF;
          tile_max[r] = fmaxf(tile_max[r], sim[j][e]);
          tot[r] += ok ? logit : 0.f;
          pos[r] += ok && is_pos ? logit : 0.f;
          if (distill) {
            simm[j][e] = ok ? s * simm[j][e] : NEG_INF;
            mtile_max[r] = fmaxf(mtile_max[r], simm[j][e]);
          }
        } else {  // -log sigmoid(eps * logit) = softplus(-eps * logit)
          const float z = is_pos ? -logit : logit;
          tot[r] += ok ? fmaxf(z, 0.f) + logf(1.f + expf(-fabsf(z))) : 0.f;
        }
      }
    if (a.kind != LOSS_CLIP) continue;
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // online log-sum-exp, per lane (merged over the quad at the end)
      const float m_new = fmaxf(m_i[r], tile_max[r]);
      const float m_safe = m_new == NEG_INF ? 0.f : m_new;
      float sum = 0.f, msum = 0.f, wsum = 0.f;
      const float mm_new = fmaxf(mm_i[r], mtile_max[r]);
      const float mm_safe = mm_new == NEG_INF ? 0.f : mm_new;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          sum += expf(sim[j][e] - m_safe);
          if (distill && simm[j][e] != NEG_INF) {
            const float w = expf(simm[j][e] - mm_safe);
            msum += w;
            wsum += w * sim[j][e];
          }
        }
      l_i[r] = l_i[r] * expf(m_i[r] - m_safe) + sum;
      m_i[r] = m_new;
      if (distill) {
        const float alpha = expf(mm_i[r] - mm_safe);
        lm_i[r] = lm_i[r] * alpha + msum;
        wm_i[r] = wm_i[r] * alpha + wsum;
        mm_i[r] = mm_new;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m = quad_max(m_i[r]), m_safe = m == NEG_INF ? 0.f : m;
    const float l = quad_sum(l_i[r] * expf(m_i[r] - m_safe));
    const float mm = quad_max(mm_i[r]), mm_safe = mm == NEG_INF ? 0.f : mm;
    const float lm = quad_sum(lm_i[r] * expf(mm_i[r] - mm_safe));
    const float wm = quad_sum(wm_i[r] * expf(mm_i[r] - mm_safe));
    const float p = quad_sum(pos[r]), tt = quad_sum(tot[r]);
    const int row = m0 + r0 + (lane_id() >> 2) + 8 * r;
    if ((lane_id() & 3) == 0 && row < a.M) {
      a.stats[STAT_LSE * a.M + row] = l > 0.f ? m + logf(l) : NEG_INF;
      a.stats[STAT_POS * a.M + row] = p;
      a.stats[STAT_TOT * a.M + row] = tt;
      a.stats[STAT_LSE_M * a.M + row] = lm > 0.f ? mm + logf(lm) : NEG_INF;
      a.stats[STAT_WEIGHTED * a.M + row] = wm / (lm > 0.f ? lm : 1.f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) ctr_bwd_kernel(ContrastiveArgs a) {
  constexpr int LDO = Smem<T>::LDO;
  VLK_SMEM(smem);
  T* Rs = reinterpret_cast<T*>(smem);
  T* Cs = Rs + BM * Smem<T>::LDK;
  T* Ds = Cs + BN * Smem<T>::LDK;
  const int m0 = blockIdx.x * BM, d0 = blockIdx.y * DO, r0 = warp_id() * 16, g = lane_id() >> 2;
  const float s = *a.scale, bias = a.bias ? *a.bias : 0.f;
  const bool distill = a.rows_m != nullptr;
  float lse_row[2], lsem_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + r0 + g + 8 * r;
    lse_row[r] = row < a.M ? a.lse_row[row] : 0.f;
    lsem_row[r] = row < a.M && distill ? a.lsem_row[row] : 0.f;
  }
  float dr[DO / 8][4];
#pragma unroll
  for (int dj = 0; dj < DO / 8; ++dj) dr[dj][0] = dr[dj][1] = dr[dj][2] = dr[dj][3] = 0.f;
  float ds[2] = {0.f, 0.f}, db[2] = {0.f, 0.f}, ds_neg[2] = {0.f, 0.f}, db_neg[2] = {0.f, 0.f};
  const int n_pad = cdiv(a.N, BN) * BN;
  const int n_cols = a.kind == LOSS_CLIP && a.own ? n_pad + a.K : a.N;
  for (int n0 = 0; n0 < n_cols; n0 += BN) {
    Tiles<T> t(a, m0, n0, n_pad);
    float sim[BN / 8][4], simm[BN / 8][4];
    int arg[BN / 8][4], marg[BN / 8][4];
    sim_tile<T>(sim, arg, t.rows, t.cols, a.D, Rs, Cs);
    if (distill) sim_tile<T>(simm, marg, t.rows_m, t.cols, a.D, Rs, Cs);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // sim[j][e] becomes dLoss/dlogit
        const int r = e >> 1, row = m0 + r0 + c_row(e), col = n0 + j * 8 + c_col(e);
        const bool ok = row < a.M && col - n0 < t.cols.valid;
        const bool is_pos = t.main && a.row_off + row == a.col_off + col;
        const float pos_f = is_pos ? 1.f : 0.f;
        const float logit = s * sim[j][e] + bias;
        float gr = 0.f;
        if (a.kind == LOSS_CLIP) {
          if (a.own) {
            const float p = expf(logit - lse_row[r]);
            const float target = distill ? a.alpha * expf(s * simm[j][e] - lsem_row[r]) + (1.f - a.alpha) * pos_f
                                         : (1.f - a.smooth) * pos_f + a.smooth / a.n_cls_own;
            gr += a.w_own * (p - target);
          }
          if (a.other && t.main && ok) {
            const float q = expf(logit - a.lse_col[col]);
            gr += a.w_other * (q - ((1.f - a.smooth) * pos_f + a.smooth / a.n_cls_other));
          }
        } else {
          const float eps = is_pos ? 1.f : -1.f;
          gr = a.w_own * (-eps / (1.f + expf(eps * logit)));  // -eps * sigmoid(-eps * logit)
        }
        gr = ok ? gr : 0.f;
        (t.main ? ds : ds_neg)[r] += gr * sim[j][e];
        (t.main ? db : db_neg)[r] += gr;
        sim[j][e] = gr;
      }
    // dR += g @ column features (of the arg-max query), for the feature slice [d0, d0 + DO)
    const int q_loop = a.QR > 1 ? a.QR : t.cols.Q;
    for (int qi = 0; qi < q_loop; ++qi) {
      const int qc = a.QR > 1 ? 0 : qi;
      if (a.QR == 1 || qi == 0) {
        __syncthreads();
        load_tile(Ds, LDO, cptr<T>(t.cols.p) + qc * t.cols.sq + d0 * t.cols.sd, t.cols.s0, t.cols.sd, BN, DO,
                  t.cols.valid, a.D - d0, t.cols.vec);
        __syncthreads();
      }
      float gq[BN / 8][4];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) gq[j][e] = arg[j][e] == qi ? sim[j][e] : 0.f;
      if (a.QR == 1) {
        mm_pv<T, DO, BN / 16>(dr, gq, Ds, LDO);
      } else {  // max over the rows' queries: add into the fp32 gradient of query qi (owned by this block)
        float part[DO / 8][4];
#pragma unroll
        for (int dj = 0; dj < DO / 8; ++dj) part[dj][0] = part[dj][1] = part[dj][2] = part[dj][3] = 0.f;
        mm_pv<T, DO, BN / 16>(part, gq, Ds, LDO);
        float* out = static_cast<float*>(a.dr) + int64_t(m0) * a.sdr[0] + qi * a.sdr[1];
#pragma unroll
        for (int dj = 0; dj < DO / 8; ++dj)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = r0 + c_row(e), col = d0 + dj * 8 + c_col(e);
            if (m0 + row < a.M && col < a.D) out[row * a.sdr[0] + col * a.sdr[2]] += s * part[dj][e];
          }
      }
    }
  }
  if (a.QR == 1) {
    T* out = static_cast<T*>(a.dr) + int64_t(m0) * a.sdr[0] + d0 * a.sdr[2];
#pragma unroll
    for (int dj = 0; dj < DO / 8; ++dj)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        store_frag(out, a.sdr[0], a.sdr[2], r0 + g + 8 * r, dj * 8 + c_col(0), a.M - m0, a.D - d0,
                   s * dr[dj][2 * r], s * dr[dj][2 * r + 1]);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float v0 = quad_sum(ds[r]), v1 = quad_sum(db[r]), v2 = quad_sum(ds_neg[r]), v3 = quad_sum(db_neg[r]);
    const int row = m0 + r0 + g + 8 * r;
    if (blockIdx.y == 0 && (lane_id() & 3) == 0 && row < a.M) {
      a.dsb[row * SCALE_BIAS_SUMS + SUM_DS_COLS] = v0;
      a.dsb[row * SCALE_BIAS_SUMS + SUM_DB_COLS] = v1;
      a.dsb[row * SCALE_BIAS_SUMS + SUM_DS_NEG] = v2;
      a.dsb[row * SCALE_BIAS_SUMS + SUM_DB_NEG] = v3;
    }
  }
}

template <typename T>
const char* run(const ContrastiveArgs& a, void* stream, bool forward) {
  if (forward) {
    auto kernel = ctr_fwd_kernel<T>;
    VLK_LAUNCH(kernel, dim3(cdiv(a.M, BM)), dim3(THREADS), Smem<T>::fwd, stream, a);
  } else {
    auto kernel = ctr_bwd_kernel<T>;
    VLK_LAUNCH(kernel, dim3(cdiv(a.M, BM), contrastive_bwd_slices(a.D)), dim3(THREADS), Smem<T>::bwd, stream, a);
  }
  VLK_CHECK_LAUNCH();
}

}  // namespace

int contrastive_bwd_slices(int D) { return cdiv(D, DO); }
const char* contrastive_fwd(const ContrastiveArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return run<decltype(x)>(a, stream, true); });
}
const char* contrastive_bwd(const ContrastiveArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return run<decltype(x)>(a, stream, false); });
}

}  // namespace vlk
