#include "attention.cuh"

namespace vlk {
template const char* attention_launch<float, 32>(const AttnArgs&, void*, Pass);
}  // namespace vlk
