#include "attention.cuh"

namespace vlk {
template const char* attention_launch<__half, 128>(const AttnArgs&, void*, Pass);
}  // namespace vlk
