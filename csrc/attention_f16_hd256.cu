#include "attention.cuh"

namespace vlk {
template const char* attention_launch<__half, 256>(const AttnArgs&, void*, Pass);
}  // namespace vlk
