// Fused causal self-attention, forward and backward, for training small models on the CPU
// (semantics: softmax(scale * q k^T + causal mask) v, as F.scaled_dot_product_attention(is_causal=True);
// Python wrapper and autograd: tinymem_fast/ops/attention.py; engine: causal_attention_body.inc).
//
// At training shapes (S ~ 100, D ~ 32) one head's whole problem fits in L1/L2, so a thread packs a head
// into float32 scratch once and runs small register-blocked products on it; the S x S probabilities never
// leave the thread's cache. The backward recomputes P from the saved row logsumexp (flash-attention
// style) instead of keeping it from the forward.
//
// Like memscore.cpp, the extension is built for a baseline x86-64, so the engine is compiled three times
// (AVX-512, AVX2+FMA, portable scalar) under `#pragma GCC target` regions and picked at run time from the
// CPU's features; TINYMEM_CPU_ISA=avx512|avx2|generic forces a lower one (tests).
#include "causal_attention.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define TINYMEM_ATTN_X86 1
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "float_bits.h"

namespace tinymem::cpu {
namespace attn_detail {

// Largest head dim accepted: scratch and blocking are sized for small-model heads; larger D would
// work but has not been tuned or tested.
constexpr int64_t kMaxHeadDim = 256;
// Sequences up to kQBlock rows take one query block (exact softmax over whole rows); longer ones take
// blocks of kQBlockLong rows so that the P and dS blocks stay a bounded size.
constexpr int64_t kQBlock = 256;
constexpr int64_t kQBlockLong = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Strided [B, H, S, D] view with unit stride over D; strides in elements.
struct In {
  const void* p;
  bool bf16;
  int64_t sb, sh, ss;
};
struct Out {
  void* p;
  bool bf16;
  int64_t sb, sh, ss;
};
struct Fwd {
  In q, k, v;
  Out out;
  float* lse;
  int64_t B, H, S, D;
  double scale;
};
struct Bwd {
  In dout, q, k, v, out;
  const float* lse;
  Out dq, dk, dv;
  int64_t B, H, S, D;
  double scale;
};

inline float bf16_to_f32(uint16_t x) { return float_bits::u2f(static_cast<uint32_t>(x) << 16); }
inline uint16_t f32_to_bf16(float x) {
  // bf16_bits could carry a NaN's payload into the exponent; keep NaN a NaN
  return x != x ? uint16_t{0x7fc0} : static_cast<uint16_t>(float_bits::bf16_bits(x));
}

}  // namespace attn_detail

namespace {

// ---------------------------------------------------------------------------------------------------
// portable scalar engine (any CPU)
namespace isa_generic {
#define TINYMEM_SIMD_WIDTH 1
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int64_t L = 1;
  static constexpr int NT_R = 4, NT_NC = 4, MM_ACC = 16, MM_MAXV = 4, MM_MAXR = 8;
  static inline V keep_first(V x, int64_t n, V fill) { return n >= 1 ? x : fill; }
  static inline V exp2(V x) { return std::exp2(x); }
  static void row_in_f32(const float* s, float* d, int64_t n, int64_t np) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
    for (int64_t i = n; i < np; ++i) d[i] = 0.f;
  }
  static void row_in_bf16(const uint16_t* s, float* d, int64_t n, int64_t np) {
    for (int64_t i = 0; i < n; ++i) d[i] = attn_detail::bf16_to_f32(s[i]);
    for (int64_t i = n; i < np; ++i) d[i] = 0.f;
  }
  static void row_out_f32(const float* s, float mul, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i] * mul;
  }
  static void row_out_bf16(const float* s, float mul, uint16_t* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = attn_detail::f32_to_bf16(s[i] * mul);
  }
};
#include "causal_attention_body.inc"
}  // namespace isa_generic

#ifdef TINYMEM_ATTN_X86
// 2^x for x in [-127, 127] (clamped; NaN stays NaN): x = n + f with |f| <= 1/2, 2^f by its degree-7
// Taylor polynomial in f ln 2 (truncation below 6e-9 relative, under float32's half ulp).
#define TINYMEM_EXP2_COEFFS                                                                     \
  constexpr float kE1 = 6.93147180559945309e-1f, kE2 = 2.40226506959100712e-1f;               \
  constexpr float kE3 = 5.55041086648215800e-2f, kE4 = 9.61812910762847716e-3f;               \
  constexpr float kE5 = 1.33335581464284434e-3f, kE6 = 1.54035303933816099e-4f;               \
  constexpr float kE7 = 1.52527338040598403e-5f;                                              \
  constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// ---------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define TINYMEM_SIMD_WIDTH 8
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int64_t L = 8;
  // 16 ymm registers: 12 accumulators + loaded vectors + a broadcast
  static constexpr int NT_R = 4, NT_NC = 3, MM_ACC = 12, MM_MAXV = 3, MM_MAXR = 12;
  static inline V keep_first(V x, int64_t n, V fill) {
    if (n >= L) return x;
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(keep));
  }
  static inline V exp2(V x) {
    TINYMEM_EXP2_COEFFS
    // max/min return their second operand when one is NaN: x second keeps NaN
    x = _mm256_min_ps(bcast(127.f), _mm256_max_ps(bcast(-126.f), x));
    const V n = _mm256_round_ps(x, kRoundNearest);
    const V f = _mm256_sub_ps(x, n);
    V p = bcast(kE7);
    p = fma(p, f, bcast(kE6));
    p = fma(p, f, bcast(kE5));
    p = fma(p, f, bcast(kE4));
    p = fma(p, f, bcast(kE3));
    p = fma(p, f, bcast(kE2));
    p = fma(p, f, bcast(kE1));
    p = fma(p, f, bcast(1.f));
    // n >= -126 keeps the biased exponent normal, so 2^n is exact as bits
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static void row_in_f32(const float* s, float* d, int64_t n, int64_t np) {
    int64_t i = 0;
    for (; i + L <= n; i += L) store(d + i, load(s + i));
    for (; i < n; ++i) d[i] = s[i];
    for (; i < np; ++i) d[i] = 0.f;
  }
  static void row_in_bf16(const uint16_t* s, float* d, int64_t n, int64_t np) {
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      store(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) d[i] = attn_detail::bf16_to_f32(s[i]);
    for (; i < np; ++i) d[i] = 0.f;
  }
  static void row_out_f32(const float* s, float mul, float* d, int64_t n) {
    const V m = bcast(mul);
    int64_t i = 0;
    for (; i + L <= n; i += L) store(d + i, _mm256_mul_ps(load(s + i), m));
    for (; i < n; ++i) d[i] = s[i] * mul;
  }
  static void row_out_bf16(const float* s, float mul, uint16_t* d, int64_t n) {
    const V m = bcast(mul);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const V x = _mm256_mul_ps(load(s + i), m);
      __m256i u = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
      const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
      u = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(u),
                                               _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
      const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
    }
    for (; i < n; ++i) d[i] = attn_detail::f32_to_bf16(s[i] * mul);
  }
};
#include "causal_attention_body.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
namespace isa_avx512 {
#define TINYMEM_SIMD_WIDTH 16
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int64_t L = 16;
  // 32 zmm registers: 24 accumulators + up to 4 loaded vectors + a broadcast
  static constexpr int NT_R = 6, NT_NC = 4, MM_ACC = 24, MM_MAXV = 4, MM_MAXR = 12;
  static inline V keep_first(V x, int64_t n, V fill) {
    const __mmask16 keep = n >= L ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
    return _mm512_mask_blend_ps(keep, fill, x);
  }
  static inline V exp2(V x) {
    TINYMEM_EXP2_COEFFS
    x = _mm512_min_ps(bcast(127.f), _mm512_max_ps(bcast(-127.f), x));
    const V n = _mm512_roundscale_ps(x, kRoundNearest);
    const V f = _mm512_sub_ps(x, n);
    V p = bcast(kE7);
    p = fma(p, f, bcast(kE6));
    p = fma(p, f, bcast(kE5));
    p = fma(p, f, bcast(kE4));
    p = fma(p, f, bcast(kE3));
    p = fma(p, f, bcast(kE2));
    p = fma(p, f, bcast(kE1));
    p = fma(p, f, bcast(1.f));
    return _mm512_scalef_ps(p, n);
  }
  static inline __mmask16 first(int64_t n) {
    return n >= L ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
  }
  // masked loads never touch the lanes they skip, so rows are read exactly up to element n
  static void row_in_f32(const float* s, float* d, int64_t n, int64_t np) {
    for (int64_t i = 0; i < np; i += L) _mm512_storeu_ps(d + i, _mm512_maskz_loadu_ps(first(n - i), s + i));
  }
  static void row_in_bf16(const uint16_t* s, float* d, int64_t n, int64_t np) {
    for (int64_t i = 0; i < np; i += L) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n - i), s + i));
      _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
  }
  static void row_out_f32(const float* s, float mul, float* d, int64_t n) {
    const V m = bcast(mul);
    for (int64_t i = 0; i < n; i += L)
      _mm512_mask_storeu_ps(d + i, first(n - i), _mm512_mul_ps(load(s + i), m));
  }
  static void row_out_bf16(const float* s, float mul, uint16_t* d, int64_t n) {
    const V m = bcast(mul);
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
    const __m512i qnan = _mm512_set1_epi32(0x7fc0);
    for (int64_t i = 0; i < n; i += L) {
      const V x = _mm512_mul_ps(load(s + i), m);
      __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, lsb)), 16);
      u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), qnan);
      _mm256_mask_storeu_epi16(d + i, first(n - i), _mm512_cvtepi32_epi16(u));
    }
  }
};
#include "causal_attention_body.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif  // TINYMEM_ATTN_X86

using attn_detail::In;
using attn_detail::Out;

// Shared checks of q, k, v (and anything else shaped like them); returns [B, H, S, D].
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const char* op) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : t == &k ? "k" : "v";
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be [B, H, S, D], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op, ": ", name,
                " must be float32 or bfloat16, got ", t->scalar_type());
  }
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
              ": q, k and v must have the same shape [B, H, S, D] (self-attention, no GQA), got ", q.sizes(),
              ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(q.size(3) <= attn_detail::kMaxHeadDim, op, ": head dim D=", q.size(3),
              " is larger than the supported maximum ", attn_detail::kMaxHeadDim);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

void check_like(const at::Tensor& t, const at::Tensor& q, const char* name, const char* op) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// Rows of D elements are read in place; only a tensor whose last dim is strided gets copied.
at::Tensor unit_last(const at::Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

In view_in(const at::Tensor& t) {
  return In{t.data_ptr(), t.scalar_type() == at::kBFloat16, t.stride(0), t.stride(1), t.stride(2)};
}
Out view_out(const at::Tensor& t) {
  return Out{t.data_ptr(), t.scalar_type() == at::kBFloat16, t.stride(0), t.stride(1), t.stride(2)};
}

// [B, H, S, D] result for an input shaped like `like`: [B, S, H, D] memory when the input is sequence-major
// (Hugging Face transposes [B, S, H, D] projections into [B, H, S, D] views and transposes the result
// back), so that the caller's transpose(1, 2).contiguous() / reshape costs nothing.
at::Tensor empty_result(const at::Tensor& like, at::ScalarType dtype) {
  const auto opts = like.options().dtype(dtype);
  const int64_t B = like.size(0), H = like.size(1), S = like.size(2), D = like.size(3);
  if (like.stride(1) < like.stride(2)) return at::empty({B, S, H, D}, opts).permute({0, 2, 1, 3});
  return at::empty({B, H, S, D}, opts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale) {
  constexpr const char* op = "causal_attention_fwd";
  check_qkv(q_in, k_in, v_in, scale, op);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  at::Tensor out = empty_result(q_in, q.scalar_type());
  at::Tensor lse = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  if (B * H * S == 0) return {out, lse};
  if (D == 0) {
    // no features: every score is 0, so P is uniform over keys 0..s and out is empty
    auto pos = at::arange(1, S + 1, lse.options());
    lse.copy_(pos.log().expand({B, H, S}));
    return {out, lse};
  }
  attn_detail::Fwd f{view_in(q), view_in(k), view_in(v), view_out(out), lse.data_ptr<float>(), B, H, S, D,
                     scale};
  switch (cpu_isa::chosen()) {
#ifdef TINYMEM_ATTN_X86
    case cpu_isa::kAvx512Bf16:
    case cpu_isa::kAvx512: isa_avx512::run_forward(f); break;
    case cpu_isa::kAvx2: isa_avx2::run_forward(f); break;
#endif
    default: isa_generic::run_forward(f); break;
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  constexpr const char* op = "causal_attention_bwd";
  check_qkv(q_in, k_in, v_in, scale, op);
  check_like(dout_in, q_in, "dout", op);
  check_like(out_in, q_in, "out", op);
  const int64_t B = q_in.size(0), H = q_in.size(1), S = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(lse_in.defined() && lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat &&
                  lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == S,
              op, ": lse must be causal_attention_fwd's float32 [", B, ", ", H, ", ", S, "], got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor dout = unit_last(dout_in), out = unit_last(out_in), lse = lse_in.contiguous();
  at::Tensor dq = empty_result(q_in, q.scalar_type());
  at::Tensor dk = empty_result(k_in, k.scalar_type());
  at::Tensor dv = empty_result(v_in, v.scalar_type());
  if (B * H * S * D == 0) return {dq, dk, dv};
  attn_detail::Bwd g{view_in(dout), view_in(q), view_in(k), view_in(v), view_in(out), lse.data_ptr<float>(),
                     view_out(dq), view_out(dk), view_out(dv), B, H, S, D, scale};
  switch (cpu_isa::chosen()) {
#ifdef TINYMEM_ATTN_X86
    case cpu_isa::kAvx512Bf16:
    case cpu_isa::kAvx512: isa_avx512::run_backward(g); break;
    case cpu_isa::kAvx2: isa_avx2::run_backward(g); break;
#endif
    default: isa_generic::run_backward(g); break;
  }
  return {dq, dk, dv};
}

}  // namespace tinymem::cpu
