#include "attention.cuh"

namespace vlk {
template const char* attention_launch<float, 64>(const AttnArgs&, void*, Pass);
}  // namespace vlk
