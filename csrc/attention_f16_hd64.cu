#include "attention.cuh"

namespace vlk {
template const char* attention_launch<__half, 64>(const AttnArgs&, void*, Pass);
}  // namespace vlk
