#include "attention.cuh"

namespace vlk {
template const char* attention_launch<float, 256>(const AttnArgs&, void*, Pass);
}  // namespace vlk
