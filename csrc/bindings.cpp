// The one file with torch includes: checks the inputs, allocates the outputs, fills the launch
// structs of vlk.h and registers the kernels with torch.library:
//   TORCH_LIBRARY_IMPL(vlkernels, CUDA)      vlkernels::cuda_attention_*, cuda_gated_residual_*,
//                                            cuda_contrastive_*
//   TORCH_LIBRARY_IMPL(vlkernels, Autograd)  vlkernels::cuda_attention_fwd: its backward recorded in
//                                            C++ (no Python between a call and its kernels)
// The ops' schemas are not written here: each op family declares its argument list once
// (vlkernels/<family>/args.py) and vlkernels/_extension.py defines the schemas and fake kernels
// from it. The kernels are boxed and read their arguments by name from the schema (class Args).
// With VLK_EMULATE (tests only) the same code registers vlkernels_emu::* for CPU tensors and runs
// the kernels under csrc/emulate.h.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <Python.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "vlk.h"

#ifdef VLK_EMULATE
#define VLK_NS vlkernels_emu
#define VLK_NS_STR "vlkernels_emu"
#define VLK_KEY CPU
#define VLK_DEVICE_NAME "CPU"
constexpr bool kCuda = false;
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define VLK_NS vlkernels
#define VLK_NS_STR "vlkernels"
#define VLK_KEY CUDA
#define VLK_DEVICE_NAME "CUDA"
constexpr bool kCuda = true;
#endif


using at::Tensor;
using std::optional;

namespace {

std::string shape(const Tensor& t) { return c10::str(t.sizes()); }

// The arguments of a boxed call, by name (the names of the schema, i.e. of the Python
// declaration); `done` replaces them on the stack by the outputs.
class Args {
 public:
  Args(const c10::OperatorHandle& op, torch::jit::Stack* stack)
      : schema_(op.schema()), stack_(stack), base_(stack->size() - op.schema().arguments().size()) {}
  const char* op() const { return schema_.name().c_str(); }
  Tensor tensor(const char* name) const { return at(name).toTensor(); }
  optional<Tensor> opt_tensor(const char* name) const { return at(name).toOptional<Tensor>(); }
  int64_t integer(const char* name) const { return at(name).toInt(); }
  double real(const char* name) const { return at(name).toDouble(); }
  bool flag(const char* name) const { return at(name).toBool(); }
  std::string str(const char* name) const { return at(name).toStringRef(); }
  template <typename... Out>
  void done(Out&&... outputs) {
    torch::jit::drop(*stack_, schema_.arguments().size());
    torch::jit::push(*stack_, std::forward<Out>(outputs)...);
  }

 private:
  const c10::IValue& at(const char* name) const {
    auto i = schema_.argumentIndexWithName(name);
    TORCH_CHECK(i.has_value(), op(), ": the kernel reads an argument '", name, "' that the schema lacks: ", schema_);
    return (*stack_)[base_ + *i];
  }
  const c10::FunctionSchema& schema_;
  torch::jit::Stack* stack_;
  size_t base_;
};

void check_device(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(kCuda ? t.is_cuda() : t.is_cpu(), op, ": ", name, " must be a ", VLK_DEVICE_NAME,
              " tensor, got one on ", t.device());
}

vlk::DType dtype_of(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return vlk::DType::F32;
    case at::kHalf:
      return vlk::DType::F16;
    case at::kBFloat16:
      return vlk::DType::BF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_same(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  check_device(op, name, t);
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must be ", like.scalar_type(), ", got ",
              t.scalar_type());
}

void check_dim(const char* op, const char* name, const Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", shape(t));
}

// A fresh output; filled with NaN (integers: their minimum) under VLK_POISON=1 (the tests set it)
// so that an element a kernel forgets to write shows up.
Tensor poisoned(Tensor t) {
  const char* p = std::getenv("VLK_POISON");
  if (p && std::string(p) == "1") {
    if (t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(std::numeric_limits<int32_t>::min());
  }
  return t;
}

struct Launch {
  std::optional<c10::DeviceGuard> guard;
  void* stream = nullptr;
  explicit Launch(const Tensor& t) {
#ifndef VLK_EMULATE
    guard.emplace(t.device());
    stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
    (void)t;
#endif
  }
  void check(const char* op, const char* err) const { TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err); }
};

void strides4(int64_t* s, const Tensor& t) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
}

// ---------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------

void check_lengths(const char* op, const char* name, const optional<Tensor>& t, const Tensor& q,
                   std::initializer_list<int64_t> size) {
  if (!t) return;
  check_device(op, name, *t);
  TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), ", expected ", q.device());
  TORCH_CHECK(t->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t->scalar_type());
  TORCH_CHECK(t->sizes().equals(size), op, ": ", name, " must have shape ", c10::IntArrayRef(size), ", got ",
              shape(*t));
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

// The inputs of an attention op (vlkernels/attention/args.py: AttentionArgs), checked, and the
// launch struct they fill (it points into the tensors held here).
struct Attention {
  Tensor q, k, v;
  optional<Tensor> dense;
  vlk::AttnArgs a;
  Tensor span_lo, span_hi;  // a dense mask's spans, when computed here (dense_span)
  Tensor pos;               // the position bias's table or slopes as the kernels read them (fp32)
};

// A position bias (vlkernels/bias.py, masks.MaskArgs.position_*): T5's table [H, num_buckets] with
// its int32 bucket table [2 * max_distance + 1], or ALiBi's slopes [B or 1, H]; read as fp32.
void position_args(const Args& in, const char* op, Attention& r) {
  const optional<Tensor> pos = in.opt_tensor("position_bias"), buckets = in.opt_tensor("position_buckets");
  vlk::AttnArgs& a = r.a;
  vlk::MaskArgs& mk = a.mask;
  TORCH_CHECK(pos || !buckets, op, ": position_buckets needs position_bias (a T5 table)");
  if (!pos) return;
  check_device(op, "position_bias", *pos);
  TORCH_CHECK(pos->is_floating_point() && pos->dim() == 2, op,
              ": position_bias must be a 2-D floating tensor, got ", pos->scalar_type(), " ", shape(*pos));
  r.pos = pos->to(at::kFloat).contiguous();
  mk.pos = r.pos.data_ptr<float>();
  mk.pos_shift = int(in.integer("position_shift"));
  if (buckets) {
    check_device(op, "position_buckets", *buckets);
    TORCH_CHECK(buckets->scalar_type() == at::kInt && buckets->dim() == 1 && buckets->numel() % 2 == 1 &&
                    buckets->is_contiguous(),
                op, ": position_buckets must be a contiguous int32 [2 * max_distance + 1] tensor, got ",
                buckets->scalar_type(), " ", shape(*buckets));
    TORCH_CHECK(pos->size(0) == a.H, op, ": a T5 table must be [H, num_buckets] with H = ", a.H, ", got ",
                shape(*pos));
    mk.pos_buckets = buckets->data_ptr<int32_t>();
    mk.pos_md = int((buckets->numel() - 1) / 2);
    mk.spos0 = r.pos.size(1), mk.spos1 = 1;
  } else {
    TORCH_CHECK(pos->size(1) == a.H && (pos->size(0) == 1 || pos->size(0) == a.B), op,
                ": ALiBi slopes must be [B or 1, H] with B = ", a.B, ", H = ", a.H, ", got ", shape(*pos));
    mk.spos0 = pos->size(0) == 1 ? 0 : a.H, mk.spos1 = 1;
  }
}

Attention attn_args(const Args& in) {
  const char* op = in.op();
  Attention r{in.tensor("q"), in.tensor("k"), in.tensor("v"), in.opt_tensor("dense_mask"), {}, {}, {}};
  const Tensor &q = r.q, &k = r.k, &v = r.v;
  TORCH_CHECK(!in.opt_tensor("bias"), op, ": the CUDA C++ kernels take no float bias (a float attn_mask)");
  const optional<Tensor> key_lengths = in.opt_tensor("key_lengths"), prefix_lengths = in.opt_tensor("prefix_lengths"),
                         text_to_media = in.opt_tensor("text_to_media"), row_lo = in.opt_tensor("row_lo"),
                         row_hi = in.opt_tensor("row_hi");
  const double softcap = in.real("softcap"), dropout_p = in.real("dropout_p");
  const optional<Tensor> seed = in.opt_tensor("seed");
  const int64_t qf_mode = in.integer("qformer_mode"), media_mode = in.integer("media_mode"),
                lat = in.integer("latents_per_media");
  check_device(op, "q", q);
  dtype_of(op, "q", q);
  check_dim(op, "q", q, 4, "[B, H, Lq, D]");
  check_same(op, "k", k, q);
  check_same(op, "v", v, q);
  check_dim(op, "k", k, 4, "[B, Hk, Lk, D]");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": k and v must have the same shape, got ", shape(k), " and ", shape(v));
  const int64_t B = k.size(0), Hk = k.size(1), Lk = k.size(2), D = k.size(3), H = q.size(1), Lq = q.size(2);
  TORCH_CHECK(q.size(0) == B || q.size(0) == 1, op, ": q batch must be ", B, " (the batch of k) or 1, got ",
              q.size(0));
  TORCH_CHECK(q.size(3) == D, op, ": q head dim must equal k's (", D, "), got ", q.size(3));
  TORCH_CHECK(Hk > 0 && H % Hk == 0, op, ": q heads (", H, ") must be a multiple of k/v heads (", Hk, ")");
  TORCH_CHECK(D >= 16 && D <= 256 && D % 8 == 0, op, ": head dim must be a multiple of 8 in [16, 256], got ", D);
  TORCH_CHECK(B >= 1 && Lq >= 1 && Lk >= 1, op, ": batch and lengths must be >= 1, got q ", shape(q), ", k ",
              shape(k));
  TORCH_CHECK(qf_mode >= vlk::QFORMER_BIDIRECTIONAL && qf_mode <= vlk::QFORMER_UNIMODAL, op,
              ": qformer_mode must be 0, 1 or 2, got ", qf_mode);
  TORCH_CHECK(media_mode >= vlk::MEDIA_NONE && media_mode <= vlk::MEDIA_ALL_PREVIOUS, op,
              ": media_mode must be 0, 1 or 2, got ", media_mode);
  TORCH_CHECK(media_mode == vlk::MEDIA_NONE || text_to_media, op, ": media_mode ", media_mode, " needs text_to_media");
  TORCH_CHECK(lat >= 1, op, ": latents_per_media must be >= 1, got ", lat);
  check_lengths(op, "key_lengths", key_lengths, q, {B});
  check_lengths(op, "prefix_lengths", prefix_lengths, q, {B});
  check_lengths(op, "text_to_media", text_to_media, q, {B, Lq});
  TORCH_CHECK(bool(row_lo) == bool(row_hi), op, ": row_lo and row_hi come together");
  check_lengths(op, "row_lo", row_lo, q, {B, Lq});
  check_lengths(op, "row_hi", row_hi, q, {B, Lq});
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0, got ", softcap);
  TORCH_CHECK(dropout_p >= 0 && dropout_p <= 1, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK(dropout_p == 0 || seed, op, ": dropout needs a seed");
  if (seed) {
    check_device(op, "seed", *seed);
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                ": seed must be one int64 element, got ", seed->scalar_type(), " ", shape(*seed));
  }

  vlk::AttnArgs& a = r.a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  strides4(a.sq, q);
  if (q.size(0) != B) a.sq[0] = 0;
  strides4(a.sk, k);
  strides4(a.sv, v);
  a.B = B, a.H = H, a.Hk = Hk, a.Lq = Lq, a.Lk = Lk, a.D = D;
  a.scale = float(in.real("scale"));
  a.softcap = float(softcap);
  a.dropout = dropout_p > 0;  // the keep rule of vlkernels/attention/dropout.py
  a.seed = seed ? seed->data_ptr<int64_t>() : nullptr;
  a.dropout_threshold = int(std::floor(dropout_p * (1 << 24) + 0.5));  // dropout.threshold
  a.dropout_scale = dropout_p >= 1 ? 0.f : float(1.0 / (1.0 - dropout_p));
  vlk::MaskArgs& mk = a.mask;
  if (r.dense) {
    const Tensor& d = *r.dense;
    check_device(op, "dense_mask", d);
    TORCH_CHECK(d.scalar_type() == at::kBool, op, ": dense_mask must be bool, got ", d.scalar_type());
    TORCH_CHECK(d.dim() <= 4, op, ": dense_mask must broadcast to [B, H, Lq, Lk], got shape ", shape(d));
    r.dense = d.expand({B, H, Lq, Lk}).view(at::kByte);  // raises if it does not broadcast
    mk.dense = r.dense->data_ptr<uint8_t>();
    mk.smb = r.dense->stride(0), mk.smh = r.dense->stride(1), mk.smm = r.dense->stride(2);
    mk.smn = r.dense->stride(3);
  }
  if (key_lengths) mk.key_lengths = key_lengths->data_ptr<int32_t>();
  if (prefix_lengths) mk.prefix_lengths = prefix_lengths->data_ptr<int32_t>();
  if (text_to_media) {
    mk.text_to_media = text_to_media->data_ptr<int32_t>();
    mk.stb = text_to_media->stride(0), mk.stm = text_to_media->stride(1);
  }
  mk.causal = in.flag("causal");
  mk.qformer_queries = int(in.integer("qformer_queries")), mk.qformer_mode = int(qf_mode);
  mk.media_mode = int(media_mode), mk.latents_per_media = int(lat);
  mk.window = int(in.integer("window"));
  if (row_lo) mk.row_lo = row_lo->data_ptr<int32_t>(), mk.row_hi = row_hi->data_ptr<int32_t>();
  position_args(in, op, r);
  return r;
}

// A dense mask given without its rows' spans: the spans, computed on the device (csrc/mask_span.cu,
// one launch on `l`'s stream), so that the kernels skip the key tiles outside them and never read
// the keys outside them. The forward's autograd kernel computes them once (attention_mask_span) and
// passes them to the forward and the backward ops as row_lo / row_hi; the backward ops, which only
// that kernel calls, do not compute them (without them they read every key, with the same result).
void dense_span(Attention& r, const Launch& l, const char* op) {
  vlk::MaskArgs& mk = r.a.mask;
  if (!mk.dense || mk.row_lo) return;
  const Tensor& d = *r.dense;  // [B, H, Lq, Lk] bytes, broadcast strides
  vlk::MaskSpanArgs s;
  s.dense = mk.dense, s.smb = mk.smb, s.smh = mk.smh, s.smm = mk.smm, s.smn = mk.smn;
  s.B = r.a.B, s.H = mk.smh == 0 ? 1 : int(d.size(1)), s.Lq = r.a.Lq, s.Lk = r.a.Lk;
  r.span_lo = poisoned(at::empty({r.a.B, r.a.Lq}, r.q.options().dtype(at::kInt)));
  r.span_hi = poisoned(at::empty({r.a.B, r.a.Lq}, r.q.options().dtype(at::kInt)));
  s.lo = r.span_lo.data_ptr<int32_t>(), s.hi = r.span_hi.data_ptr<int32_t>();
  l.check(op, vlk::mask_span(s, l.stream));
  mk.row_lo = s.lo, mk.row_hi = s.hi;
}

// The plan's launch decisions (vlkernels/attention/plan.py, the op's last arguments): flash-decoding's
// key splits and a shared-query backward's dq partial sums, checked to cover every key and batch entry.
void launch_args(const Args& in, const char* op, vlk::AttnArgs& a, bool shared) {
  const int64_t splits = in.integer("splits"), per_split = in.integer("keys_per_split");
  const int64_t chunks = in.integer("dq_chunks"), per_chunk = in.integer("per_chunk");
  TORCH_CHECK(splits == 1 || (splits > 1 && per_split > 0 && per_split % vlk::SPLIT_KEYS == 0 &&
                              (splits - 1) * per_split < a.Lk && splits * per_split >= a.Lk),
              op, ": splits and keys_per_split must be 1 or cover the ", a.Lk, " keys in runs of a multiple of ",
              vlk::SPLIT_KEYS, " keys, got ", splits, " x ", per_split);
  TORCH_CHECK(per_chunk >= 1 && chunks >= 1 && (chunks - 1) * per_chunk < a.B && chunks * per_chunk >= a.B &&
                  (shared || per_chunk == 1),
              op, ": dq_chunks and per_chunk must cover the batch of ", a.B,
              shared ? "" : " one entry per chunk (the queries are not shared)", ", got ", chunks, " x ", per_chunk);
  if (splits > 1) a.splits = int(splits), a.keys_per_split = int(per_split);
  a.dq_chunks = int(chunks), a.b_per_chunk = int(per_chunk);
}

void attention_fwd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  Attention r = attn_args(in);
  vlk::AttnArgs& a = r.a;
  Tensor out = poisoned(at::empty({a.B, a.Lq, a.H, a.D}, r.q.options())).transpose(1, 2);
  Tensor lse = poisoned(at::empty({a.B, a.H, a.Lq}, r.q.options().dtype(at::kFloat)));
  a.o = out.data_ptr();
  strides4(a.so, out);
  a.lse = lse.data_ptr<float>();
  Tensor o_partial, lse_partial;
  launch_args(in, op, a, r.q.size(0) == 1 && a.B > 1);
  if (a.splits > 1) {
    const auto f32 = r.q.options().dtype(at::kFloat);
    o_partial = poisoned(at::empty({a.splits, a.B, a.H, a.Lq, a.D}, f32));
    lse_partial = poisoned(at::empty({a.splits, a.B, a.H, a.Lq}, f32));
    a.o_partial = o_partial.data_ptr<float>(), a.lse_partial = lse_partial.data_ptr<float>();
  }
  Launch l(r.q);
  dense_span(r, l, op);
  l.check(op, vlk::attention_fwd(a, dtype_of(op, "q", r.q), l.stream));
  in.done(out, lse);
}

// A dense mask's row spans, int32 [B, Lq] lo and hi (dense_span), from the forward's arguments.
void attention_mask_span(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  Attention r = attn_args(in);
  TORCH_CHECK(r.dense && !r.a.mask.row_lo, op, ": needs a dense_mask without row_lo / row_hi");
  Launch l(r.q);
  dense_span(r, l, op);
  in.done(r.span_lo, r.span_hi);
}

// The backward's inputs common to its ops: out, grad_out, lse checked and set.
void grad_args(const Args& in, const char* op, Attention& r) {
  vlk::AttnArgs& a = r.a;
  const Tensor &q = r.q, grad_out = in.tensor("grad_out"), out = in.tensor("out"), lse = in.tensor("lse");
  const std::vector<int64_t> out_shape{a.B, a.H, a.Lq, a.D};
  check_same(op, "grad_out", grad_out, q);
  check_same(op, "out", out, q);
  TORCH_CHECK(grad_out.sizes().equals(out_shape), op, ": grad_out must have shape ", c10::IntArrayRef(out_shape),
              ", got ", shape(grad_out));
  TORCH_CHECK(out.sizes().equals(out_shape), op, ": out must have shape ", c10::IntArrayRef(out_shape), ", got ",
              shape(out));
  check_device(op, "lse", lse);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes().equals({int64_t(a.B), int64_t(a.H), int64_t(a.Lq)}),
              op, ": lse must be a contiguous float32 [B, H, Lq] tensor, got ", lse.scalar_type(), " ", shape(lse));
  a.out = out.data_ptr();
  strides4(a.so, out);
  a.grad_out = grad_out.data_ptr();
  strides4(a.sdo, grad_out);
  a.lse = lse.data_ptr<float>();
}

void attention_bwd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  Attention r = attn_args(in);
  vlk::AttnArgs& a = r.a;
  const Tensor& q = r.q;
  grad_args(in, op, r);
  Tensor delta = poisoned(at::empty({a.B, a.H, a.Lq}, q.options().dtype(at::kFloat)));
  a.delta = delta.data_ptr<float>();
  Tensor dq = poisoned(at::empty_like(q)), dk = poisoned(at::empty_like(r.k)), dv = poisoned(at::empty_like(r.v));
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  strides4(a.sdq, dq);
  strides4(a.sdk, dk);
  strides4(a.sdv, dv);
  const bool shared = q.size(0) == 1 && a.B > 1;
  launch_args(in, op, a, shared);
  Tensor partial;
  if (shared) {  // partial dq sums, reduced below
    partial = poisoned(at::empty({a.dq_chunks, a.H, a.Lq, a.D}, q.options().dtype(at::kFloat)));
    a.dq_partial = partial.data_ptr<float>();
  }
  Launch l(q);
  l.check(op, vlk::attention_bwd(a, dtype_of(op, "q", q), l.stream));
  if (shared) dq.copy_(partial.sum(0, true));
  in.done(dq, dk, dv);
}

// The position bias's gradient: T5's table [H, num_buckets], ALiBi's slopes [B, H] (fp32), the
// kernel's per-tile partial sums added in a fixed order.
void attention_position_grad(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  Attention r = attn_args(in);
  vlk::AttnArgs& a = r.a;
  TORCH_CHECK(a.mask.pos, op, ": no position bias (position_bias) to take the gradient of");
  grad_args(in, op, r);  // (no delta: the kernel computes its own, exactly)
  const bool t5 = a.mask.pos_buckets != nullptr;
  a.pos_width = t5 ? int(r.pos.size(1)) : 1;
  const vlk::DType dt = dtype_of(op, "q", r.q);
  const int tiles = vlk::attention_position_tiles(a, dt);
  Tensor partial = poisoned(at::empty({a.B, a.H, tiles, a.pos_width}, r.q.options().dtype(at::kFloat)));
  a.pos_partial = partial.data_ptr<float>();
  Launch l(r.q);
  l.check(op, vlk::attention_position_grad(a, dt, l.stream));
  in.done(t5 ? partial.sum(std::vector<int64_t>{0, 2}) : partial.select(3, 0).sum(2));
}

// The autograd of cuda_attention_fwd, in C++: its Autograd kernel records AttentionFn, whose
// forward calls the op again below autograd (the kernel above, or a fake kernel under
// torch.compile) and whose backward calls cuda_attention_bwd with the forward's arguments, matched
// by name (and, when a position bias's table or slopes need a gradient, cuda_attention_position_grad,
// which takes the backward's arguments). q, k, v and the position bias are differentiable (the
// kernels take no float bias).
struct AttentionOps {
  c10::OperatorHandle fwd, bwd, position_grad, mask_span;
  size_t q, k, v, position, dense, row_lo, row_hi;  // their positions among the forward's arguments
  std::vector<int64_t> bwd_source;  // per backward argument: a forward argument's position, or
                                    // GRAD_OUT / OUT / LSE
  static constexpr int64_t GRAD_OUT = -1, OUT = -2, LSE = -3;
};

const AttentionOps& attention_ops() {
  static const AttentionOps ops = [] {
    auto& d = c10::Dispatcher::singleton();
    AttentionOps o{d.findSchemaOrThrow(VLK_NS_STR "::cuda_attention_fwd", ""),
                   d.findSchemaOrThrow(VLK_NS_STR "::cuda_attention_bwd", ""),
                   d.findSchemaOrThrow(VLK_NS_STR "::cuda_attention_position_grad", ""),
                   d.findSchemaOrThrow(VLK_NS_STR "::cuda_attention_mask_span", ""), 0, 0, 0, 0, 0, 0, 0, {}};
    const auto& fs = o.fwd.schema();
    auto index = [&](const std::string& name) {
      auto i = fs.argumentIndexWithName(name);
      TORCH_CHECK(i.has_value(), "cuda_attention_bwd reads '", name, "', which cuda_attention_fwd lacks: ", fs);
      return *i;
    };
    o.q = index("q"), o.k = index("k"), o.v = index("v"), o.position = index("position_bias");
    o.dense = index("dense_mask"), o.row_lo = index("row_lo"), o.row_hi = index("row_hi");
    TORCH_CHECK(o.bwd.schema().arguments().size() == o.position_grad.schema().arguments().size(),
                "cuda_attention_position_grad must take cuda_attention_bwd's arguments");
    for (const auto& a : o.bwd.schema().arguments()) {
      const std::string& n = a.name();
      o.bwd_source.push_back(n == "grad_out" ? AttentionOps::GRAD_OUT
                             : n == "out"    ? AttentionOps::OUT
                             : n == "lse"    ? AttentionOps::LSE
                                             : int64_t(index(n)));
    }
    return o;
  }();
  return ops;
}

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  // `args`: every argument of cuda_attention_fwd; `inputs`: q, k, v and the position bias's table
  // or slopes where there is one, among them, passed apart for autograd.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                                                c10::impl::GenericList args) {
    ctx->saved_data["position"] = inputs.size() > 3;
    torch::jit::Stack stack(args.begin(), args.end());
    {
      at::AutoDispatchBelowADInplaceOrView below;
      attention_ops().fwd.callBoxed(&stack);
    }
    Tensor out = stack[0].toTensor(), lse = stack[1].toTensor();
    ctx->mark_non_differentiable({lse});
    // Every tensor argument is saved (in-place changes before the backward are caught), the
    // rest kept as it is.
    std::vector<Tensor> saved{out, lse};
    c10::List<int64_t> where;
    for (size_t i = 0; i < args.size(); ++i) {
      if (args.get(i).isTensor()) {
        saved.push_back(args.get(i).toTensor());
        where.push_back(int64_t(i));
        args.set(i, c10::IValue());
      }
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["args"] = args;
    ctx->saved_data["tensors_at"] = where;
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "attention: double backward (create_graph=True) is not supported; its backward is not differentiable");
    const AttentionOps& ops = attention_ops();
    const auto saved = ctx->get_saved_variables();
    auto args = ctx->saved_data["args"].toList().copy();
    const auto where = ctx->saved_data["tensors_at"].toIntList();
    for (size_t i = 0; i < where.size(); ++i) args.set(where.get(i), saved[2 + i]);
    torch::jit::Stack stack;
    stack.reserve(ops.bwd_source.size());
    for (int64_t src : ops.bwd_source) {
      if (src == AttentionOps::GRAD_OUT) stack.emplace_back(grads[0]);
      else if (src == AttentionOps::OUT) stack.emplace_back(saved[0]);
      else if (src == AttentionOps::LSE) stack.emplace_back(saved[1]);
      else stack.push_back(args.get(src));
    }
    const bool position = ctx->saved_data["position"].toBool();
    Tensor dposition;
    if (position && ctx->needs_input_grad(3)) {  // its own op, on the same arguments
      torch::jit::Stack again(stack.begin(), stack.end());
      at::AutoDispatchBelowADInplaceOrView below;
      ops.position_grad.callBoxed(&again);
      const Tensor table = args.get(ops.position).toTensor();
      dposition = again[0].toTensor();
      if (table.size(0) != dposition.size(0)) dposition = dposition.sum(0, true);  // slopes [1, H]
      dposition = dposition.to(table.scalar_type());
    }
    {
      at::AutoDispatchBelowADInplaceOrView below;
      ops.bwd.callBoxed(&stack);
    }
    torch::autograd::variable_list out{stack[0].toTensor(), stack[1].toTensor(), stack[2].toTensor()};
    if (position) out.push_back(dposition);
    out.emplace_back();  // args
    return out;
  }
};

void attention_fwd_autograd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  const AttentionOps& ops = attention_ops();
  const size_t n = handle.schema().arguments().size();
  c10::impl::GenericList args(c10::AnyType::get());
  args.reserve(n);
  for (size_t i = stack->size() - n; i < stack->size(); ++i) args.push_back((*stack)[i]);
  if (args.get(ops.dense).isTensor() && args.get(ops.row_lo).isNone()) {  // the spans, once (dense_span)
    torch::jit::Stack span(args.begin(), args.end());
    {
      at::AutoDispatchBelowADInplaceOrView below;
      ops.mask_span.callBoxed(&span);
    }
    args.set(ops.row_lo, std::move(span[0]));
    args.set(ops.row_hi, std::move(span[1]));
  }
  const Tensor q = args.get(ops.q).toTensor(), k = args.get(ops.k).toTensor(), v = args.get(ops.v).toTensor();
  std::vector<Tensor> inputs{q, k, v};
  if (args.get(ops.position).isTensor()) inputs.push_back(args.get(ops.position).toTensor());
  auto outs = AttentionFn::apply(at::TensorList(inputs), std::move(args));
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(outs[0]), std::move(outs[1]));
}

// ---------------------------------------------------------------------------------------------
// gated residual (the epilogue of Flamingo's gated cross-attention)
// ---------------------------------------------------------------------------------------------

void check_gated(const char* op, const char* xname, const Tensor& x, const Tensor& y, const Tensor& gate) {
  check_device(op, xname, x);
  dtype_of(op, xname, x);
  check_same(op, "y", y, x);
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": ", xname, " and y must have the same shape, got ", shape(x), " and ",
              shape(y));
  check_device(op, "gate", gate);
  TORCH_CHECK(gate.numel() == 1 && gate.is_floating_point(), op,
              ": gate must be a one-element floating tensor, got ", gate.scalar_type(), " ", shape(gate));
}

void gated_residual_fwd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  const Tensor x = in.tensor("x"), y = in.tensor("y"), gate = in.tensor("gate");
  check_gated(op, "x", x, y, gate);
  Tensor xc = x.contiguous(), yc = y.contiguous(), g = gate.to(at::kFloat).contiguous();
  Tensor out = poisoned(at::empty_like(xc));
  vlk::GatedArgs a;
  a.x = xc.data_ptr(), a.y = yc.data_ptr(), a.gate = g.data_ptr<float>(), a.out = out.data_ptr();
  a.n = xc.numel();
  Launch l(x);
  if (a.n) l.check(op, vlk::gated_residual_fwd(a, dtype_of(op, "x", x), l.stream));
  in.done(out);
}

void gated_residual_bwd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  const Tensor grad_out = in.tensor("grad_out"), y = in.tensor("y"), gate = in.tensor("gate");
  check_gated(op, "grad_out", grad_out, y, gate);
  Tensor dc = grad_out.contiguous(), yc = y.contiguous(), g = gate.to(at::kFloat).contiguous();
  Tensor dy = poisoned(at::empty_like(yc));
  vlk::GatedArgs a;
  a.grad_out = dc.data_ptr(), a.y = yc.data_ptr(), a.gate = g.data_ptr<float>(), a.dy = dy.data_ptr();
  a.n = yc.numel();
  Tensor partial = poisoned(at::empty({vlk::gated_blocks(a.n)}, y.options().dtype(at::kFloat)));
  a.partial = partial.data_ptr<float>();
  Launch l(y);
  if (a.n) l.check(op, vlk::gated_residual_bwd(a, dtype_of(op, "grad_out", grad_out), l.stream));
  Tensor t = at::tanh(g);
  Tensor dgate = (partial.sum() * (1 - t * t)).to(gate.scalar_type()).view(gate.sizes());
  in.done(dy, dgate);
}

// ---------------------------------------------------------------------------------------------
// contrastive row passes
// ---------------------------------------------------------------------------------------------

// The inputs of a row pass (vlkernels/contrastive/args.py: RowPass), checked, and the launch
// struct they fill (it points into the tensors held here).
struct RowPass {
  Tensor rows, cols, scale, bias;
  vlk::ContrastiveArgs a;
};

RowPass ctr_args(const Args& in) {
  const char* op = in.op();
  RowPass r{in.tensor("rows"), in.tensor("cols"), in.tensor("scale"), {}, {}};
  const Tensor &rows = r.rows, &cols = r.cols, &scale = r.scale;
  const optional<Tensor> rows_m = in.opt_tensor("rows_m"), neg = in.opt_tensor("neg"), bias = in.opt_tensor("bias");
  const std::string kind = in.str("kind");
  check_device(op, "rows", rows);
  dtype_of(op, "rows", rows);
  check_dim(op, "rows", rows, 3, "[M, QR, D]");
  check_same(op, "cols", cols, rows);
  check_dim(op, "cols", cols, 3, "[N, QC, D]");
  const int64_t M = rows.size(0), QR = rows.size(1), D = rows.size(2), N = cols.size(0), QC = cols.size(1);
  TORCH_CHECK(cols.size(2) == D, op, ": cols feature dim must be ", D, ", got ", cols.size(2));
  TORCH_CHECK(QR == 1 || QC == 1, op, ": only one side may have several queries, got rows ", shape(rows),
              ", cols ", shape(cols));
  TORCH_CHECK(M >= 1 && N >= 1 && D >= 1 && QR >= 1 && QC >= 1, op, ": empty features, rows ", shape(rows),
              ", cols ", shape(cols));
  TORCH_CHECK(kind == "clip" || kind == "siglip", op, ": kind must be 'clip' or 'siglip', got '", kind, "'");
  if (rows_m) {
    check_same(op, "rows_m", *rows_m, rows);
    TORCH_CHECK(rows_m->sizes() == rows.sizes(), op, ": rows_m must have the shape of rows ", shape(rows),
                ", got ", shape(*rows_m));
  }
  if (neg) {
    check_same(op, "neg", *neg, rows);
    check_dim(op, "neg", *neg, 2, "[K, D]");
    TORCH_CHECK(neg->size(1) == D, op, ": neg feature dim must be ", D, ", got ", neg->size(1));
  }
  check_device(op, "scale", scale);
  TORCH_CHECK(scale.numel() == 1 && scale.is_floating_point(), op, ": scale must be a one-element floating tensor, got ",
              shape(scale));
  r.scale = scale.to(at::kFloat).contiguous();
  if (bias) {
    check_device(op, "bias", *bias);
    TORCH_CHECK(bias->numel() == 1 && bias->is_floating_point(), op,
                ": bias must be a one-element floating tensor, got ", shape(*bias));
    r.bias = bias->to(at::kFloat).contiguous();
  }
  vlk::ContrastiveArgs& a = r.a;
  a.rows = rows.data_ptr(), a.cols = cols.data_ptr();
  for (int i = 0; i < 3; ++i) a.sr[i] = rows.stride(i), a.sc[i] = cols.stride(i);
  if (rows_m) {
    a.rows_m = rows_m->data_ptr();
    for (int i = 0; i < 3; ++i) a.srm[i] = rows_m->stride(i);
  }
  if (neg && neg->size(0) > 0) {
    a.neg = neg->data_ptr();
    a.sneg[0] = neg->stride(0), a.sneg[1] = neg->stride(1);
    a.K = neg->size(0);
  }
  a.scale = r.scale.data_ptr<float>();
  a.bias = bias ? r.bias.data_ptr<float>() : nullptr;
  a.M = M, a.N = N, a.D = D, a.QR = QR, a.QC = QC;
  a.kind = kind == "clip" ? vlk::LOSS_CLIP : vlk::LOSS_SIGLIP;
  a.row_off = in.integer("row_off"), a.col_off = in.integer("col_off");
  return r;
}

void check_stat(const char* op, const char* name, const optional<Tensor>& t, int64_t n, const Tensor& like) {
  if (!t) return;
  check_device(op, name, *t);
  TORCH_CHECK(t->device() == like.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->dim() == 1 && t->size(0) == n,
              op, ": ", name, " must be a contiguous float32 [", n, "] tensor on ", like.device(), ", got ",
              t->scalar_type(), " ", shape(*t));
}

void contrastive_fwd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  RowPass r = ctr_args(in);
  Tensor stats = poisoned(at::empty({vlk::ROW_STATS, r.a.M}, r.rows.options().dtype(at::kFloat)));
  r.a.stats = stats.data_ptr<float>();
  Launch l(r.rows);
  l.check(op, vlk::contrastive_fwd(r.a, dtype_of(op, "rows", r.rows), l.stream));
  in.done(stats);
}

void contrastive_bwd(const c10::OperatorHandle& handle, torch::jit::Stack* stack) {
  Args in(handle, stack);
  const char* op = in.op();
  RowPass r = ctr_args(in);
  vlk::ContrastiveArgs& a = r.a;
  const Tensor& rows = r.rows;
  const Tensor lse_row = in.tensor("lse_row");
  const optional<Tensor> lsem_row = in.opt_tensor("lsem_row"), lse_col = in.opt_tensor("lse_col");
  const bool other = in.flag("other");
  check_stat(op, "lse_row", lse_row, a.M, rows);
  check_stat(op, "lsem_row", lsem_row, a.M, rows);
  check_stat(op, "lse_col", lse_col, a.N, rows);
  TORCH_CHECK(!a.rows_m || lsem_row, op, ": rows_m (distillation) needs lsem_row");
  TORCH_CHECK(!other || lse_col, op, ": other=True needs lse_col");
  a.lse_row = lse_row.data_ptr<float>();
  a.lsem_row = lsem_row ? lsem_row->data_ptr<float>() : nullptr;
  a.lse_col = lse_col ? lse_col->data_ptr<float>() : nullptr;
  a.own = in.flag("own"), a.other = other;
  a.w_own = float(in.real("w_own")), a.w_other = float(in.real("w_other")), a.smooth = float(in.real("smooth"));
  a.n_cls_own = float(in.integer("n_cls_own")), a.n_cls_other = float(in.integer("n_cls_other"));
  a.alpha = float(in.real("alpha"));
  Tensor dr = a.QR > 1 ? at::zeros(rows.sizes(), rows.options().dtype(at::kFloat)) : poisoned(at::empty_like(rows));
  Tensor dsb = poisoned(at::empty({a.M, vlk::SCALE_BIAS_SUMS}, rows.options().dtype(at::kFloat)));
  a.dr = dr.data_ptr();
  for (int i = 0; i < 3; ++i) a.sdr[i] = dr.stride(i);
  a.dsb = dsb.data_ptr<float>();
  Launch l(rows);
  l.check(op, vlk::contrastive_bwd(a, dtype_of(op, "rows", rows), l.stream));
  in.done(dr.to(rows.scalar_type()), dsb.sum(0));
}

}  // namespace

// Kernels only: the schemas are defined from Python (vlkernels/_extension.py), after this module
// is imported.
#define VLK_BOXED(fn) torch::CppFunction::makeFromBoxedFunction<&fn>()
TORCH_LIBRARY_IMPL(VLK_NS, VLK_KEY, m) {
  m.impl("cuda_attention_fwd", VLK_BOXED(attention_fwd));
  m.impl("cuda_attention_bwd", VLK_BOXED(attention_bwd));
  m.impl("cuda_attention_position_grad", VLK_BOXED(attention_position_grad));
  m.impl("cuda_attention_mask_span", VLK_BOXED(attention_mask_span));
  m.impl("cuda_gated_residual_fwd", VLK_BOXED(gated_residual_fwd));
  m.impl("cuda_gated_residual_bwd", VLK_BOXED(gated_residual_bwd));
  m.impl("cuda_contrastive_fwd", VLK_BOXED(contrastive_fwd));
  m.impl("cuda_contrastive_bwd", VLK_BOXED(contrastive_bwd));
}
TORCH_LIBRARY_IMPL(VLK_NS, Autograd, m) { m.impl("cuda_attention_fwd", VLK_BOXED(attention_fwd_autograd)); }

// The Python module: importing it registers the kernels; ARCHS says which GPUs the kernels target.
#define VLK_CAT_(a, b) a##b
#define VLK_CAT(a, b) VLK_CAT_(a, b)
#define VLK_STR_(a) #a
#define VLK_STR(a) VLK_STR_(a)
#define VLK_STR_ALL_(...) #__VA_ARGS__
#define VLK_STR_ALL(...) VLK_STR_ALL_(__VA_ARGS__)

PyMODINIT_FUNC VLK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, VLK_STR(TORCH_EXTENSION_NAME), "vlkernels CUDA C++ kernels", -1,
                            nullptr};
  PyObject* mod = PyModule_Create(&def);
#ifdef VLK_ARCH_LIST  // e.g. 80,90a from setup.py -> "sm_80, sm_90a"
  std::string archs = "sm_";
  for (char c : std::string(VLK_STR_ALL(VLK_ARCH_LIST))) archs += c == ',' ? std::string(", sm_") : std::string(1, c);
#else
  std::string archs = "CPU emulation";
#endif
  if (mod) PyModule_AddStringConstant(mod, "ARCHS", archs.c_str());
  return mod;
}
