// CPU memscore: fused lm_head + greedy-match / NLL / argmax, tiled over tokens and vocabulary so the
// [M, V] logits never exist (semantics: tinymem_fast/ops/memscore.py; engine: memscore_body.inc).
//
// The extension is compiled for a baseline x86-64 (setup.py: -march=x86-64-v2, no AVX), so the engine
// is compiled three times -- AVX-512, AVX2+FMA+F16C, and portable scalar -- under `#pragma GCC target`
// regions and chosen at run time from the CPU's features (TINYMEM_CPU_ISA=avx512|avx2|generic forces a
// lower one, for tests). Everything inside a region has internal linkage, so no ISA-specific copy of an
// inline function can leak into code that runs on other CPUs.
#include "memscore.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TINYMEM_X86_SIMD 1
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "float_bits.h"
#include "memscore_kernel.h"

namespace tinymem::cpu {
namespace {

using float_bits::u2f;
// round-to-nearest-even float32 -> bfloat16 -> float32 (NaN: unspecified)
inline float round_bf16_scalar(float x) { return u2f(float_bits::bf16_bits(x) << 16); }

// ---------------------------------------------------------------------------------------------------
// portable scalar engine (any CPU)
namespace isa_generic {
#define TINYMEM_SIMD_WIDTH 1
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int L = 1, R = 4, NV = 8;
  static inline float sfma(float a, float b, float c) { return a * b + c; }
  static inline int first_eq(const float* p, float m) { return *p == m ? 0 : -1; }
  static inline V exp(V x) { return std::exp(x); }
  static inline float round1(float x, int rnd) {
    if (rnd == 1) return static_cast<float>(c10::Half(x));
    if (rnd == 2) return round_bf16_scalar(x);
    return x;
  }
  template <int RND>
  static inline V round(V x) { return round1(x, RND); }
  static void cvt16(const uint16_t* s, bool bf16, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      d[i] = bf16 ? u2f(static_cast<uint32_t>(s[i]) << 16) : c10::detail::fp16_ieee_to_fp32_value(s[i]);
  }
};
#include "memscore_body.inc"
}  // namespace isa_generic

#ifdef TINYMEM_X86_SIMD
// expf on [-87.3, 88.3] (inputs clamped; every caller passes x <= 0): Cody-Waite reduction by ln 2 and
// a degree-7 polynomial (Cephes coefficients), about 1 ulp.
#define TINYMEM_EXP_COEFFS                                                                      \
  constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;    \
  constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;      \
  constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;    \
  constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// ---------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace isa_avx2 {
#define TINYMEM_SIMD_WIDTH 8
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int L = 8, R = 6, NV = 2;  // 12 accumulators + 2 panel vectors + 1 broadcast
  static inline float sfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static inline int first_eq(const float* p, float m) {
    const int k = _mm256_movemask_ps(_mm256_cmp_ps(load(p), bcast(m), _CMP_EQ_OQ));
    return k ? __builtin_ctz(k) : -1;
  }
  static inline V exp(V x) {
    TINYMEM_EXP_COEFFS
    x = _mm256_min_ps(_mm256_max_ps(x, bcast(-87.3f)), bcast(88.3f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, bcast(kLog2e)), kRoundNearest);
    V r = _mm256_fnmadd_ps(n, bcast(kC1), x);
    r = _mm256_fnmadd_ps(n, bcast(kC2), r);
    V p = bcast(kP0);
    p = fma(p, r, bcast(kP1));
    p = fma(p, r, bcast(kP2));
    p = fma(p, r, bcast(kP3));
    p = fma(p, r, bcast(kP4));
    p = fma(p, r, bcast(kP5));
    p = fma(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, bcast(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static inline float round1(float x, int rnd) {
    if (rnd == 1) return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
    if (rnd == 2) return round_bf16_scalar(x);
    return x;
  }
  template <int RND>
  static inline V round(V x) {
    if constexpr (RND == 1) {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if constexpr (RND == 2) {
      __m256i u = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
      return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    } else {
      return x;
    }
  }
  static void cvt16(const uint16_t* s, bool bf16, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      const V f = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                       : _mm256_cvtph_ps(h);
      _mm256_storeu_ps(d + i, f);
    }
    for (; i < n; ++i) d[i] = bf16 ? u2f(static_cast<uint32_t>(s[i]) << 16) : _cvtsh_ss(s[i]);
  }
};
#include "memscore_body.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2")
namespace isa_avx512 {
#define TINYMEM_SIMD_WIDTH 16
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int L = 16, R = 12, NV = 2;  // 24 accumulators + 2 panel vectors + 1 broadcast
  static inline float sfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static inline int first_eq(const float* p, float m) {
    const __mmask16 k = _mm512_cmp_ps_mask(load(p), bcast(m), _CMP_EQ_OQ);
    return k ? __builtin_ctz(static_cast<unsigned>(k)) : -1;
  }
  static inline V exp(V x) {
    TINYMEM_EXP_COEFFS
    x = _mm512_min_ps(_mm512_max_ps(x, bcast(-87.3f)), bcast(88.3f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, bcast(kLog2e)), kRoundNearest);
    V r = _mm512_fnmadd_ps(n, bcast(kC1), x);
    r = _mm512_fnmadd_ps(n, bcast(kC2), r);
    V p = bcast(kP0);
    p = fma(p, r, bcast(kP1));
    p = fma(p, r, bcast(kP2));
    p = fma(p, r, bcast(kP3));
    p = fma(p, r, bcast(kP4));
    p = fma(p, r, bcast(kP5));
    p = fma(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, bcast(1.f)));
    return _mm512_scalef_ps(p, n);
  }
  static inline float round1(float x, int rnd) {
    if (rnd == 1) return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
    if (rnd == 2) return round_bf16_scalar(x);
    return x;
  }
  template <int RND>
  static inline V round(V x) {
    if constexpr (RND == 1) {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if constexpr (RND == 2) {
      __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
      return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    } else {
      return x;
    }
  }
  static void cvt16(const uint16_t* s, bool bf16, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
      const V f = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                       : _mm512_cvtph_ps(h);
      _mm512_storeu_ps(d + i, f);
    }
    for (; i < n; ++i) d[i] = bf16 ? u2f(static_cast<uint32_t>(s[i]) << 16) : _cvtsh_ss(s[i]);
  }
};
#include "memscore_body.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif  // TINYMEM_X86_SIMD

void run(const memscore_detail::Problem& p) {
  switch (cpu_isa::chosen()) {
#ifdef TINYMEM_X86_SIMD
    case cpu_isa::kAvx512Bf16:
    case cpu_isa::kAvx512: isa_avx512::run(p); break;
    case cpu_isa::kAvx2: isa_avx2::run(p); break;
#endif
    default: isa_generic::run(p); break;
  }
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return memscore_detail::kF32;
    case at::kHalf: return memscore_detail::kF16;
    case at::kBFloat16: return memscore_detail::kBF16;
    default: break;
  }
  TORCH_CHECK(false, "hidden must be float32, float16 or bfloat16, got ", t.scalar_type());
  return 0;
}

// Fills the shared part of a Problem; returns the float32 bias kept alive by the caller.
at::Tensor setup(memscore_detail::Problem& p, const at::Tensor& hidden, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), op,
              ": hidden and weight must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [M, d], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, d], got ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), op, ": hidden has d=", hidden.size(1), " but weight is ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight is ", weight.scalar_type(),
              " but hidden is ", hidden.scalar_type());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), op, ": hidden and weight must be contiguous");
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, op, ": weight is empty: ", weight.sizes());
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be a CPU tensor of shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": bias is ", bias->scalar_type(),
                " but hidden is ", hidden.scalar_type());
    b32 = bias->to(at::kFloat).contiguous();
  }
  p.hidden = hidden.data_ptr();
  p.weight = weight.data_ptr();
  p.bias32 = b32.defined() ? b32.data_ptr<float>() : nullptr;
  p.targets = nullptr;
  p.dtype = dtype_code(hidden);
  p.M = hidden.size(0);
  p.d = hidden.size(1);
  p.V = weight.size(0);
  p.need_nll = false;
  p.early_exit = false;
  p.match = nullptr;
  p.nll = nullptr;
  p.argmax = nullptr;
  return b32;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> memscore(const at::Tensor& hidden, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                            bool need_nll, bool early_exit, int64_t chunk_size) {
  memscore_detail::Problem p;
  const at::Tensor b32 = setup(p, hidden, weight, bias, "memscore");
  TORCH_CHECK(!(early_exit && need_nll), "memscore: early_exit needs need_nll=false");
  TORCH_CHECK(chunk_size >= 0, "memscore: chunk_size must be >= 0 (0 = default), got ", chunk_size);
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == p.M && targets.is_contiguous(),
              "memscore: targets must be a contiguous int64 CPU tensor of shape [", p.M, "], got ",
              targets.scalar_type(), " ", targets.sizes());
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.M; ++i)
    TORCH_CHECK(y[i] >= 0 && y[i] < p.V, "memscore: targets contain id ", y[i], " at row ", i,
                ", outside the vocabulary [0, ", p.V, ")");
  at::Tensor match = at::zeros({p.M}, hidden.options().dtype(at::kBool));
  at::Tensor nll = at::zeros({p.M}, hidden.options().dtype(at::kFloat));
  if (p.M == 0) return {match, nll};
  p.targets = y;
  p.need_nll = need_nll;
  p.early_exit = early_exit;
  p.chunk = chunk_size;
  p.match = reinterpret_cast<uint8_t*>(match.data_ptr<bool>());
  p.nll = nll.data_ptr<float>();
  run(p);
  return {match, nll};
}

at::Tensor lm_head_argmax(const at::Tensor& hidden, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t chunk_size) {
  memscore_detail::Problem p;
  const at::Tensor b32 = setup(p, hidden, weight, bias, "lm_head_argmax");
  TORCH_CHECK(chunk_size >= 0, "lm_head_argmax: chunk_size must be >= 0 (0 = default), got ", chunk_size);
  at::Tensor out = at::zeros({p.M}, hidden.options().dtype(at::kLong));
  if (p.M == 0) return out;
  p.chunk = chunk_size;
  p.argmax = out.data_ptr<int64_t>();
  run(p);
  return out;
}

}  // namespace tinymem::cpu
