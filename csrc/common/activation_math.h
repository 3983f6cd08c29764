// The SwiGLU gate of the Llama MLP: silu(gate) * up, in fp32 (rounded once to the output dtype by the caller).
#pragma once
#include <cmath>

#include "common/half_float.h"

namespace llama_fast {
namespace activation {

LF_HD float silu(float x) { return x / (1.0f + expf(-x)); }

LF_HD float silu_mul(float gate, float up) { return silu(gate) * up; }

}  // namespace activation
}  // namespace llama_fast
