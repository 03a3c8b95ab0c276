#include "attention.cuh"

namespace vlk {
template const char* attention_launch<__nv_bfloat16, 128>(const AttnArgs&, void*, Pass);
}  // namespace vlk
