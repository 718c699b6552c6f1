// Bit-level float32 / bfloat16 helpers shared by the CPU kernels. Include at file scope, outside any
// `#pragma GCC target` region, so every translation unit compiles these inline functions the same way.
#pragma once
#include <cstdint>
#include <cstring>

namespace tinymem::cpu::float_bits {

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// round-to-nearest-even float32 -> bfloat16 bits (finite inputs; NaN: unspecified)
inline uint32_t bf16_bits(float x) {
  uint32_t u = f2u(x);
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

}  // namespace tinymem::cpu::float_bits
