// CPU fused linear + cross-entropy, forward and backward (semantics and the layout of the work:
// tinymem_fast/ops/linear_cross_entropy.py; per-row engine: linear_cross_entropy_body.inc).
//
// The products are ATen's (MKL / oneDNN, which are as fast as anything written here could be) on chunks
// of rows x the whole vocabulary; between them one fused pass per row turns the chunk's logits into
// their gradient in place (max, sum of exps, loss, softmax - one-hot), parallel over rows, so a chunk is
// read from memory about once between the products instead of once per elementwise op. The engine is
// compiled per instruction set, like memscore.cpp's, and picked from cpu_isa::chosen() at each call.
#include "linear_cross_entropy.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__)
#define TINYMEM_LCE_X86 1
#include <immintrin.h>
#endif

#include "cpu_isa.h"

namespace tinymem::cpu {
namespace {

// float32 logits per row chunk when the caller passes chunk_rows = 0 (ops/linear_cross_entropy.py's
// CHUNK_BYTES)
constexpr int64_t kChunkBytes = int64_t{64} << 20;

// ---------------------------------------------------------------------------------------------------
namespace isa_generic {
#define TINYMEM_SIMD_WIDTH 1
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int64_t L = 1;
  static inline V exp(V x) { return std::exp(x); }
};
#include "linear_cross_entropy_body.inc"
}  // namespace isa_generic

#ifdef TINYMEM_LCE_X86
// exp(x) = 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so r is exact to a few
// ulp), e^r by its degree-7 Taylor polynomial (|r| <= ln2/2: truncation 6e-9 relative, under half an ulp).
#define TINYMEM_LCE_EXP_COEFFS                                                                     \
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f;                    \
  constexpr float kLn2Lo = 1.42860682030941723e-6f;                                              \
  constexpr float kC2 = 0.5f, kC3 = 1.66666666666666667e-1f, kC4 = 4.16666666666666667e-2f;        \
  constexpr float kC5 = 8.33333333333333333e-3f, kC6 = 1.38888888888888889e-3f;                   \
  constexpr float kC7 = 1.98412698412698413e-4f;                                                  \
  constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define TINYMEM_SIMD_WIDTH 8
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int64_t L = 8;
  static inline V exp(V x) {
    TINYMEM_LCE_EXP_COEFFS
    // below -87.3 the result is under float32's smallest normal: 0 (exp(-inf) = 0 for masked logits);
    // max/min return their second operand when one is NaN, so x second keeps a NaN a NaN
    const V tiny = _mm256_cmp_ps(x, bcast(-87.3f), _CMP_LT_OQ);
    x = _mm256_min_ps(bcast(88.3f), _mm256_max_ps(bcast(-87.3f), x));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, bcast(kLog2e)), kRoundNearest);
    V r = _mm256_fnmadd_ps(n, bcast(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, bcast(kLn2Lo), r);
    V p = bcast(kC7);
    p = fma(p, r, bcast(kC6));
    p = fma(p, r, bcast(kC5));
    p = fma(p, r, bcast(kC4));
    p = fma(p, r, bcast(kC3));
    p = fma(p, r, bcast(kC2));
    p = fma(p, r, bcast(1.f));
    p = fma(p, r, bcast(1.f));
    // |n| <= 127 here, so 2^n is exact as exponent bits
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
};
#include "linear_cross_entropy_body.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
namespace isa_avx512 {
#define TINYMEM_SIMD_WIDTH 16
#include "simd_ops.inc"
struct Isa : VecOps {
  static constexpr int64_t L = 16;
  static inline V exp(V x) {
    TINYMEM_LCE_EXP_COEFFS
    // scalef scales by 2^n with gradual underflow, so only the overflow side needs a clamp; -104 is
    // below float32's smallest subnormal, so exp(-inf) comes out 0
    x = _mm512_min_ps(bcast(88.7f), _mm512_max_ps(bcast(-104.f), x));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, bcast(kLog2e)), kRoundNearest);
    V r = _mm512_fnmadd_ps(n, bcast(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, bcast(kLn2Lo), r);
    V p = bcast(kC7);
    p = fma(p, r, bcast(kC6));
    p = fma(p, r, bcast(kC5));
    p = fma(p, r, bcast(kC4));
    p = fma(p, r, bcast(kC3));
    p = fma(p, r, bcast(kC2));
    p = fma(p, r, bcast(1.f));
    p = fma(p, r, bcast(1.f));
    return _mm512_scalef_ps(p, n);
  }
};
#include "linear_cross_entropy_body.inc"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif  // TINYMEM_LCE_X86

using CeRow = void (*)(float*, int64_t, int64_t, float, float, bool, float*, float*);
using GradRow = void (*)(float*, int64_t, int64_t, float, float, float, float);
struct Engine {
  CeRow ce;
  GradRow grad;
};

Engine engine() {
  switch (cpu_isa::chosen()) {
#ifdef TINYMEM_LCE_X86
    case cpu_isa::kAvx512Bf16:
    case cpu_isa::kAvx512: return {isa_avx512::ce_row, isa_avx512::grad_row};
    case cpu_isa::kAvx2: return {isa_avx2::ce_row, isa_avx2::grad_row};
#endif
    default: return {isa_generic::ce_row, isa_generic::grad_row};
  }
}

struct Problem {
  at::Tensor h, w, y;
  std::optional<at::Tensor> bias;
  int64_t ignore, n, vocab;
  float eps;
  bool half;
  Engine eng;
};

Problem make_problem(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& targets, int64_t ignore_index,
                     double label_smoothing) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(), op,
              ": hidden, weight and targets must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) > 0, op,
              ": weight must be [V, d] with V > 0 and d = ", hidden.size(1), ", got shape ", weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": hidden must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight is ", weight.scalar_type(), " but hidden is ", dt);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              op, ": targets must be int64 [N] = [", hidden.size(0), "], got ", targets.scalar_type(), " ",
              targets.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dt && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                op, ": bias must be a CPU ", dt, " tensor [", weight.size(0), "], got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  Problem p{hidden.contiguous(), weight.contiguous(), targets.contiguous(),
            bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt,
            ignore_index, hidden.size(0), weight.size(0), static_cast<float>(label_smoothing),
            dt != at::kFloat, engine()};
  const int64_t* y = p.y.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.n; ++i) {
    TORCH_CHECK(y[i] == ignore_index || (y[i] >= 0 && y[i] < p.vocab), op, ": target ", y[i], " at row ", i,
                " is outside [0, ", p.vocab, ") and not ignore_index=", ignore_index);
  }
  return p;
}

// each row's share of the upstream gradient: 0 where ignored, else 1/n (mean) or 1 (sum) times `grad`
// (0-dim, or [N] for reduction none)
at::Tensor row_scale(const Problem& p, int64_t reduction, const at::Tensor* grad) {
  at::Tensor valid = p.y.ne(p.ignore).to(at::kFloat);
  at::Tensor scale = valid;
  if (reduction == 1) scale = valid / valid.sum().clamp_min(1);
  if (grad != nullptr) scale = scale * grad->to(at::kFloat);
  return scale.contiguous();
}

void logits(const Problem& p, const at::Tensor& h, int64_t v0, int64_t cols, at::Tensor& out) {
  const at::Tensor wt = p.w.narrow(0, v0, cols).t();
  if (p.bias.has_value())
    at::addmm_out(out, p.bias->narrow(0, v0, cols), h, wt);
  else
    at::mm_out(out, h, wt);
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// One pass over row chunks (module docstring of ops/linear_cross_entropy.py). Forward (lse_known false):
// fills lse and loss; backward (true): reads lse. The gradients asked for (defined tensors) are made
// with `scale`; gw is a float32 head's weight gradient, accumulated chunk by chunk.
void rows_pass(const Problem& p, const float* scale, float* lse, float* loss, bool lse_known, int64_t chunk,
               at::Tensor* gh, at::Tensor* gw, at::Tensor* gb) {
  const int64_t vocab = p.vocab;
  const bool grads = gh != nullptr || gw != nullptr || gb != nullptr;
  chunk = std::min(chunk, p.n);
  if (chunk == 0) return;
  at::Tensor zin = at::empty({chunk, vocab}, p.h.options());
  at::Tensor zf = p.half ? at::empty({chunk, vocab}, p.h.options().dtype(at::kFloat)) : zin;
  const int64_t* y = p.y.data_ptr<int64_t>();
  const float eps = p.eps, eps_v = p.eps / static_cast<float>(vocab), keep = 1.f - p.eps;
  for (int64_t r0 = 0; r0 < p.n; r0 += chunk) {
    const int64_t rows = std::min(chunk, p.n - r0);
    at::Tensor zi = zin.narrow(0, 0, rows), zc = zf.narrow(0, 0, rows);
    const at::Tensor hc = p.h.narrow(0, r0, rows);
    logits(p, hc, 0, vocab, zi);
    if (p.half) zc.copy_(zi);
    float* z = zc.data_ptr<float>();
    const Engine eng = p.eng;
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t i = r0 + r, t = y[i] == p.ignore ? -1 : y[i];
        float* row = z + r * vocab;
        if (lse_known)
          eng.grad(row, vocab, t, lse[i], scale[i], eps_v, keep);
        else
          eng.ce(row, vocab, t, grads ? scale[i] : 0.f, eps, grads, lse + i, loss + i);
      }
    });
    if (!grads) continue;
    if (gb != nullptr) gb->add_(zc.sum(0));
    // a half-precision head's logit gradient is rounded once to its dtype, as the plain path's cast does
    if (p.half) zi.copy_(zc);
    const at::Tensor& dz = p.half ? zi : zc;
    if (gh != nullptr) {
      at::Tensor out = gh->narrow(0, r0, rows);
      at::mm_out(out, dz, p.w);
    }
    if (gw != nullptr) {
      if (r0 == 0)
        at::mm_out(*gw, dz.t(), hc);
      else
        gw->addmm_(dz.t(), hc);
    }
  }
}

// A half-precision head's weight gradient: per vocabulary slice, the logits of all rows, their gradient,
// and one product over all rows into the slice of the result (one rounding, no float32 [V, d] buffer).
at::Tensor vocab_pass(const Problem& p, const float* scale, const float* lse) {
  at::Tensor gw = at::empty_like(p.w);
  const int64_t n = p.n, vocab = p.vocab;
  if (n == 0) return gw.zero_();
  const int64_t step = std::max<int64_t>(64, std::min<int64_t>(vocab, kChunkBytes / (4 * n)));
  at::Tensor zin = at::empty({n * std::min(step, vocab)}, p.h.options());
  at::Tensor zf = p.half ? at::empty({zin.numel()}, p.h.options().dtype(at::kFloat)) : zin;
  const int64_t* y = p.y.data_ptr<int64_t>();
  const float eps_v = p.eps / static_cast<float>(vocab), keep = 1.f - p.eps;
  for (int64_t v0 = 0; v0 < vocab; v0 += step) {
    const int64_t cols = std::min(step, vocab - v0);
    at::Tensor zi = zin.narrow(0, 0, n * cols).view({n, cols});
    at::Tensor zc = zf.narrow(0, 0, n * cols).view({n, cols});
    logits(p, p.h, v0, cols, zi);
    if (p.half) zc.copy_(zi);
    float* z = zc.data_ptr<float>();
    const Engine eng = p.eng;
    at::parallel_for(0, n, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t t = y[r];
        const int64_t local = (t != p.ignore && t >= v0 && t < v0 + cols) ? t - v0 : -1;
        eng.grad(z + r * cols, cols, local, lse[r], scale[r], eps_v, keep);
      }
    });
    if (p.half) zi.copy_(zc);
    at::Tensor out = gw.narrow(0, v0, cols);
    at::mm_out(out, (p.half ? zi : zc).t(), p.h);
  }
  return gw;
}

int64_t pick_chunk(int64_t chunk_rows, int64_t n, int64_t vocab) {
  if (chunk_rows > 0) return chunk_rows;
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(n, 1), kChunkBytes / (4 * vocab)));
}

at::Tensor none_like(const at::Tensor& t, at::ScalarType dt) { return at::empty({0}, t.options().dtype(dt)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double label_smoothing, int64_t reduction, bool need_hidden,
    bool need_weight, bool need_bias, int64_t chunk_rows) {
  constexpr const char* op = "linear_ce_fwd";
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  const Problem p = make_problem(op, hidden, weight, bias, targets, ignore_index, label_smoothing);
  if (reduction == 0) need_hidden = need_weight = need_bias = false;
  need_bias = need_bias && p.bias.has_value();
  const auto f32 = p.h.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({p.n}, f32), loss = at::empty({p.n}, f32);
  at::Tensor scale = row_scale(p, reduction, nullptr);
  at::Tensor gh = need_hidden ? at::empty_like(p.h) : none_like(p.h, p.h.scalar_type());
  // a half-precision head's weight gradient waits for the upstream gradient (linear_ce_bwd)
  const bool gw_here = need_weight && !p.half;
  // rows_pass writes the first chunk's product over it; with no rows it stays 0
  at::Tensor gw = gw_here ? (p.n ? at::empty_like(p.w) : at::zeros_like(p.w)) : none_like(p.w, p.w.scalar_type());
  at::Tensor gb = need_bias ? at::zeros({p.vocab}, f32) : none_like(p.h, at::kFloat);
  rows_pass(p, scale.data_ptr<float>(), lse.data_ptr<float>(), loss.data_ptr<float>(), false,
            pick_chunk(chunk_rows, p.n, p.vocab), need_hidden ? &gh : nullptr, gw_here ? &gw : nullptr,
            need_bias ? &gb : nullptr);
  if (reduction != 0) {
    at::Tensor total = loss.sum();
    // mean over counted rows: 0/0 = NaN with none counted, as F.cross_entropy
    loss = reduction == 1 ? total / p.y.ne(p.ignore).sum().to(at::kFloat) : total;
  }
  return {loss, lse, gh, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_bwd(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool need_hidden, bool need_weight,
    bool need_bias, int64_t chunk_rows) {
  constexpr const char* op = "linear_ce_bwd";
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  const Problem p = make_problem(op, hidden, weight, bias, targets, ignore_index, label_smoothing);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == p.n, op,
              ": lse must be linear_ce_fwd's float32 [", p.n, "], got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(reduction == 0 ? (grad.dim() == 1 && grad.size(0) == p.n) : grad.dim() == 0, op,
              ": grad must be [N] for reduction none and 0-dim otherwise, got shape ", grad.sizes());
  need_bias = need_bias && p.bias.has_value();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor scale = row_scale(p, reduction, &grad);
  at::Tensor gh = need_hidden ? at::empty_like(p.h) : none_like(p.h, p.h.scalar_type());
  const bool gw_rows = need_weight && !p.half;
  at::Tensor gw = gw_rows ? (p.n ? at::empty_like(p.w) : at::zeros_like(p.w)) : none_like(p.w, p.w.scalar_type());
  at::Tensor gb = need_bias ? at::zeros({p.vocab}, p.h.options().dtype(at::kFloat)) : none_like(p.h, at::kFloat);
  if (need_hidden || gw_rows || need_bias) {
    rows_pass(p, scale.data_ptr<float>(), const_cast<float*>(lse_c.data_ptr<float>()), nullptr, true,
              pick_chunk(chunk_rows, p.n, p.vocab), need_hidden ? &gh : nullptr, gw_rows ? &gw : nullptr,
              need_bias ? &gb : nullptr);
  }
  if (need_weight && p.half) gw = vocab_pass(p, scale.data_ptr<float>(), lse_c.data_ptr<float>());
  return {gh, gw, gb};
}

}  // namespace tinymem::cpu
