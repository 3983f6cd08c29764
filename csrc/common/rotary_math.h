// Rotary embedding, HF "rotate_half" convention: dimension i pairs with i + D/2 (not Meta's interleaved
// pairs). cos/sin come from the cache at the token's position, index i in 0..D/2-1. Computed in fp32.
#pragma once
#include "common/half_float.h"

namespace llama_fast {
namespace rotary {

LF_HD void rotate_pair(float x1, float x2, float c, float s, float* y1, float* y2) {
  *y1 = x1 * c - x2 * s;
  *y2 = x2 * c + x1 * s;
}

}  // namespace rotary
}  // namespace llama_fast
