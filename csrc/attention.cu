// Masked attention's entry points: the dtype and head-dim switch over the instantiations in
// attention_<dtype>_hd<DP>.cu (kernels and launchers: attention.cuh).
#include "attention.cuh"

namespace vlk {

extern template const char* attention_launch<float, 32>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<float, 64>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<float, 128>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<float, 256>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__half, 32>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__half, 64>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__half, 128>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__half, 256>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__nv_bfloat16, 32>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__nv_bfloat16, 64>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__nv_bfloat16, 128>(const AttnArgs&, void*, bool);
extern template const char* attention_launch<__nv_bfloat16, 256>(const AttnArgs&, void*, bool);

namespace {

template <typename T>
const char* dispatch(const AttnArgs& a, void* stream, bool forward) {
  if (a.D <= 32) return attention_launch<T, 32>(a, stream, forward);
  if (a.D <= 64) return attention_launch<T, 64>(a, stream, forward);
  if (a.D <= 128) return attention_launch<T, 128>(a, stream, forward);
  return attention_launch<T, 256>(a, stream, forward);
}

}  // namespace

const char* attention_fwd(const AttnArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return dispatch<decltype(x)>(a, stream, true); });
}
const char* attention_bwd(const AttnArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return dispatch<decltype(x)>(a, stream, false); });
}

}  // namespace vlk
