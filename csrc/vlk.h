// Launch interface of the CUDA kernels: plain structs of pointers, strides and sizes, so that the
// .cu files need no torch headers (they compile in seconds) and only bindings.cpp includes torch.
#pragma once

#include <cstdint>

namespace vlk {

enum class DType { F32 = 0, F16 = 1, BF16 = 2 };

// The codes the Python side passes; vlkernels.masks.QFormerMode / MediaMode and
// vlkernels.contrastive.args.LossKind have the same names and values (tests/test_ops.py compares).
enum QFormerMode : int { QFORMER_BIDIRECTIONAL = 0, QFORMER_MULTIMODAL_CAUSAL = 1, QFORMER_UNIMODAL = 2 };
enum MediaMode : int { MEDIA_NONE = 0, MEDIA_IMMEDIATE = 1, MEDIA_ALL_PREVIOUS = 2 };
enum LossKind : int { LOSS_CLIP = 0, LOSS_SIGLIP = 1 };
// The contrastive forward's row statistics [ROW_STATS, M] and the backward's sums [M,
// SCALE_BIAS_SUMS], in the order of vlkernels.contrastive.args.RowStats / ScaleBiasSums.
enum RowStat : int {
  STAT_LSE = 0, STAT_POS = 1, STAT_TOT = 2, STAT_LSE_M = 3, STAT_WEIGHTED = 4, ROW_STATS = 5
};
enum ScaleBiasSum : int {
  SUM_DS_COLS = 0, SUM_DB_COLS = 1, SUM_DS_NEG = 2, SUM_DB_NEG = 3, SCALE_BIAS_SUMS = 4
};

// The attention mask as lowered by vlkernels/masks.py (MaskArgs): per query row an allowed key interval
// [lo, hi) from the analytic parts, and optionally a dense bool mask on top.
struct MaskArgs {
  const uint8_t* dense = nullptr;  // [B, H, Lq, Lk] (broadcast strides), 1 = may attend
  int64_t smb = 0, smh = 0, smm = 0, smn = 0;
  const int32_t* key_lengths = nullptr;     // [B]
  const int32_t* prefix_lengths = nullptr;  // [B]
  const int32_t* text_to_media = nullptr;   // [B, Lq]
  int64_t stb = 0, stm = 0;
  bool causal = false;
  int qformer_queries = 0, qformer_mode = QFORMER_BIDIRECTIONAL;  // a QFormerMode
  int media_mode = MEDIA_NONE, latents_per_media = 1;               // a MediaMode
  int window = 0;                             // sliding window, 0: none
  const int32_t *row_lo = nullptr, *row_hi = nullptr;  // [B, Lq] contiguous: per-row key bounds
  // a position bias (vlkernels/bias.py), fp32: T5's table [H, num_buckets] (spos0: a head,
  // spos1: a bucket) with its bucket table [2 * pos_md + 1] (relative position r at r + pos_md,
  // clamped), or ALiBi's slopes [B, H] (spos0: a batch entry, 0 when shared; spos1: a head);
  // query row i sits at key position i + (Lk - Lq) + pos_shift
  const float* pos = nullptr;
  int64_t spos0 = 0, spos1 = 0;
  const int32_t* pos_buckets = nullptr;
  int pos_md = 0, pos_shift = 0;
};

// q [Bq, H, Lq, D] (Bq = B or 1: sq[0] is 0 for shared queries), k, v [B, Hk, Lk, D], out and
// grad_out [B, H, Lq, D], lse and delta [B, H, Lq] fp32 (log2 units), any strides.
struct AttnArgs {
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  const void* out = nullptr;
  const void* grad_out = nullptr;
  void *o = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* lse = nullptr;
  float* delta = nullptr;
  float* dq_partial = nullptr;  // [chunks, H, Lq, D] fp32 when the queries are shared
  int64_t sq[4], sk[4], sv[4], so[4], sdo[4], sdq[4], sdk[4], sdv[4];
  int B = 0, H = 0, Hk = 0, Lq = 0, Lk = 0, D = 0;
  int dq_chunks = 1, b_per_chunk = 1;
  float scale = 1.f;
  float softcap = 0.f;  // > 0: scores capped to softcap * tanh(s / softcap)
  // attention dropout (vlkernels/attention/dropout.py): keep iff Philox's top 24 bits >= threshold
  bool dropout = false;
  const int64_t* seed = nullptr;  // one int64 the kernels read: a new seed is a new value, not a new argument
  int dropout_threshold = 0;
  float dropout_scale = 1.f;
  // flash-decoding: the forward's keys in `splits` runs of keys_per_split (a multiple of the key
  // tile); each writes an fp32 partial output [splits, B, H, Lq, D] and lse [splits, B, H, Lq]
  // (log2, -inf: no key), which a second kernel combines into o and lse
  int splits = 1, keys_per_split = 0;  // keys_per_split: a multiple of SPLIT_KEYS
  float *o_partial = nullptr, *lse_partial = nullptr;
  // the position bias's gradient: per (batch entry, head, query tile) the sums of dS per T5
  // bucket (pos_width = num_buckets), or of dS * -|i - j| for ALiBi (pos_width = 1), fp32
  // [B, H, query tiles, pos_width], added up by the caller in a fixed order
  float* pos_partial = nullptr;
  int pos_width = 0;
  MaskArgs mask;
};

// A dense bool mask [B, H, Lq, Lk] (broadcast strides; H: its own heads, 1 when it broadcasts
// them) -> per query row the span [lo, hi) of its allowed keys over the heads, int32 [B, Lq]
// contiguous (lo = Lk, hi = 0: none).
struct MaskSpanArgs {
  const uint8_t* dense = nullptr;
  int64_t smb = 0, smh = 0, smm = 0, smn = 0;
  int B = 0, H = 0, Lq = 0, Lk = 0;
  int32_t *lo = nullptr, *hi = nullptr;
};

// Rows [M, QR, D] against columns [cols [N, QC, D] ; neg [K, D]] (see vlkernels/contrastive/args.py).
struct ContrastiveArgs {
  const void *rows = nullptr, *rows_m = nullptr, *cols = nullptr, *neg = nullptr;
  const float *scale = nullptr, *bias = nullptr;  // one fp32 element each (bias may be null)
  int64_t sr[3], srm[3], sc[3], sneg[2], sdr[3];
  int M = 0, N = 0, K = 0, D = 0, QR = 1, QC = 1;
  int kind = LOSS_CLIP;  // a LossKind
  int64_t row_off = 0, col_off = 0;
  float* stats = nullptr;  // forward: [5, M]
  // backward
  const float *lse_row = nullptr, *lsem_row = nullptr, *lse_col = nullptr;
  void* dr = nullptr;  // [M, QR, D]: rows' dtype when QR == 1, fp32 (zeroed, accumulated) otherwise
  float* dsb = nullptr;  // [M, 4]
  bool own = true, other = false;
  float w_own = 0.f, w_other = 0.f, smooth = 0.f, n_cls_own = 1.f, n_cls_other = 1.f, alpha = 0.f;
};

// x + tanh(gate) * y over n contiguous elements; backward: dy = tanh(gate) * dout and one fp32
// partial sum of dout * y per block (gated_blocks(n) of them).
struct GatedArgs {
  const void *x = nullptr, *y = nullptr, *grad_out = nullptr;
  const float* gate = nullptr;  // one fp32 element
  void *out = nullptr, *dy = nullptr;
  float* partial = nullptr;
  int64_t n = 0;
};

// Flash-decoding's runs of keys are multiples of this (every forward key tile divides it).
constexpr int SPLIT_KEYS = 64;

// Each returns nullptr on success, or the CUDA error string of the launch.
const char* attention_fwd(const AttnArgs& a, DType dt, void* stream);
const char* attention_bwd(const AttnArgs& a, DType dt, void* stream);
// The position bias's gradient (the partial sums of pos_partial); its query tiles:
int attention_position_tiles(const AttnArgs& a, DType dt);
const char* attention_position_grad(const AttnArgs& a, DType dt, void* stream);
const char* mask_span(const MaskSpanArgs& a, void* stream);
const char* contrastive_fwd(const ContrastiveArgs& a, DType dt, void* stream);
const char* contrastive_bwd(const ContrastiveArgs& a, DType dt, void* stream);
const char* gated_residual_fwd(const GatedArgs& a, DType dt, void* stream);
const char* gated_residual_bwd(const GatedArgs& a, DType dt, void* stream);
int64_t gated_blocks(int64_t n);
int contrastive_bwd_slices(int D);

}  // namespace vlk
