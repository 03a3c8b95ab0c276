// Masked attention's entry points: the dtype and head-dim switch over the instantiations in
// attention_<dtype>_hd<DP>.cu (kernels and launchers: attention.cuh).
#include "attention.cuh"

namespace vlk {

extern template const char* attention_launch<float, 32>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<float, 64>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<float, 128>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<float, 256>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__half, 32>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__half, 64>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__half, 128>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__half, 256>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__nv_bfloat16, 32>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__nv_bfloat16, 64>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__nv_bfloat16, 128>(const AttnArgs&, void*, Pass);
extern template const char* attention_launch<__nv_bfloat16, 256>(const AttnArgs&, void*, Pass);

namespace {

template <typename T>
const char* dispatch(const AttnArgs& a, void* stream, Pass pass) {
  if (a.D <= 32) return attention_launch<T, 32>(a, stream, pass);
  if (a.D <= 64) return attention_launch<T, 64>(a, stream, pass);
  if (a.D <= 128) return attention_launch<T, 128>(a, stream, pass);
  return attention_launch<T, 256>(a, stream, pass);
}

template <typename T>
int position_tile(int D) {
  if (D <= 32) return Cfg<T, 32>::DQ_BM;
  if (D <= 64) return Cfg<T, 64>::DQ_BM;
  if (D <= 128) return Cfg<T, 128>::DQ_BM;
  return Cfg<T, 256>::DQ_BM;
}

}  // namespace

const char* attention_fwd(const AttnArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return dispatch<decltype(x)>(a, stream, Pass::FWD); });
}
const char* attention_bwd(const AttnArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return dispatch<decltype(x)>(a, stream, Pass::BWD); });
}
int attention_position_tiles(const AttnArgs& a, DType dt) {
  const int tile = dt == DType::F16    ? position_tile<__half>(a.D)
                   : dt == DType::BF16 ? position_tile<__nv_bfloat16>(a.D)
                                       : position_tile<float>(a.D);
  return cdiv(a.Lq, tile);
}
const char* attention_position_grad(const AttnArgs& a, DType dt, void* stream) {
  return with_dtype(dt, [&](auto x) { return dispatch<decltype(x)>(a, stream, Pass::POSITION_GRAD); });
}

}  // namespace vlk
