// Greedy-decoding LM head for float32 weights on AVX-512-BF16 CPUs: argmax_v (hidden @ W.T + bias), equal
// bit for bit to lm_head_argmax (memscore.cpp), without computing most logits in float32.
//
// A decode step throws away every logit but the largest. vdpbf16ps does twice the multiply-adds of an fp32
// FMA per instruction and reads half the bytes of W, but its logits are approximate. So every logit is
// screened in bf16 together with a rigorous bound on its distance from the float32 kernel's logit, and
// only the few that could still be the maximum are recomputed -- with the float32 kernel's own operation
// sequence, so ties and near-ties resolve exactly as there.
//
// Error bound. u = 2^-24, g(n, u) = n u / (1 - n u). For one token row h and one vocab row w (float32, d
// long): t = sum_k h_k w_k (real), S = sum_k |h_k w_k| <= ||h|| ||w|| (Cauchy-Schwarz), hn >= ||h||,
// wn >= ||w|| (both rounded up).
//  - x, the float32 kernel's dot product: a chain of d FMAs (d multiplies and adds under
//    TINYMEM_CPU_ISA=generic); every term passes at most d+1 roundings: |x - t| <= g(d+1, u) S + flushes.
//  - y, the screening dot product of h^ = bf16(h), w^ = bf16(w) (round to nearest even). vdpbf16ps reads
//    denormals as zero and flushes denormal results, so |h^_k - h_k| <= 2^-8 |h_k| + 2^-126, and
//    |h^_k w^_k - h_k w_k| <= (2^-7 + 2^-16) |h_k w_k| + 2^-126 (1 + 2^-8)(|h_k| + |w_k|) + 2^-252, where
//    sum_k (|h_k| + |w_k|) <= sqrt(d) (hn + wn). A product of two bf16 values is exact in float32; a lane
//    accumulates its column over ceil(d/2) instructions of at most two roundings each, allowed here to be
//    directed ones (relative 2u; RNE needs only u), over terms summing to at most 1.01 S:
//    |y - sum_k h^_k w^_k| <= 1.01 g(d+2, 2u) S + flushes.
//  - the logits X = fl(x + b), A = fl(y + b) (b = bias[v] or 0): |A - X| <= (1 + u)|y - x| + 2u/(1-u) |A|.
//  Together: |A - X| <= E = m ((c hn + tau) wn + tau hn + tau0) + k |A| with
//    c = 2^-7 + 2^-15 + 1.01 g(d+2, 2u) + g(d+1, u),  tau = 2^-123 sqrt(d),  tau0 = (d + 8) 2^-122,
//    m = 1 + 2^-9 (covers the 1 + u and the float32 rounding of computing E),
//    k = 2^-21 (covers 2u/(1-u) |A| and the rounding of A - E and A + E themselves).
//  tau and tau0 absorb every underflow: each of fewer than 4(d + 4) operations flushes less than 2^-126,
//  also under torch.set_flush_denormal(True), which makes the float32 kernel flush as well (hn, wn and
//  the per-row coefficients are kept at or above FLT_MIN so that flushing cannot zero them).
//  Then lo_v = A_v - E_v <= X_v <= A_v + E_v = up_v, L = max_v lo_v <= X_{v*} for the argmax v*, and every v
//  with X_v = X_{v*} has up_v >= X_{v*} >= L: the exact answer, ties included, is among the candidates
//  {v : up_v >= L}, which are then recomputed exactly.
//  The bound needs every float32 partial sum finite: |partial| <= 1.01 hn wn < 2^125 and |b| < 2^126.
//  Rows with hn >= 2^62 or a non-finite hidden value, and rows whose L is not finite (every logit -inf),
//  take the float32 kernel instead, as does the whole call when some wn >= 2^62 (or is NaN) or a bias
//  entry is NaN, +inf or finite beyond 2^126 (bias -inf, used to suppress tokens, is fine).
#include "head_screen.h"

#include "cpu_isa.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "float_bits.h"
#include "memscore.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define TINYMEM_HEAD_SCREEN_X86 1
#include <immintrin.h>
#endif

namespace tinymem::cpu {
namespace {

constexpr int64_t kLanes = 16;         // vocab columns per panel: one zmm of float32 logits
constexpr int64_t kTilePanels = 4;     // microkernel width: 4 panels = 64 columns
constexpr int64_t kRows = 6;           // microkernel height: 6 x 4 accumulators + 4 panel vectors + 1
constexpr int64_t kMaxBlockRows = 240; // a block's bf16 rows (240 x d/2 words) stay in L2 with a tile
constexpr double kBig = 0x1p62;        // norms at or above this could overflow float32 partial sums
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::atomic<int64_t> g_stats[4];  // calls, rows screened, exact candidates, fallback rows

using float_bits::bf16_bits;

// a float32 >= x (x >= 0 or NaN), and >= FLT_MIN so that a flushing FPU cannot read it as zero
inline float round_up_f(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(x) && static_cast<double>(f) < x)
    f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f < FLT_MIN ? FLT_MIN : f;  // NaN stays NaN
}

// ||x||_2 rounded up (see round_up_f). The squares are exact in double; eight partial sums keep the
// adds independent, and any order of d additions loses at most (d - 1) 2^-53 relative.
float norm_up(const float* x, int64_t d) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= d; k += 8)
    for (int i = 0; i < 8; ++i) s[i] += static_cast<double>(x[k + i]) * x[k + i];
  for (; k < d; ++k) s[0] += static_cast<double>(x[k]) * x[k];
  const double sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  return round_up_f(std::sqrt(sum * (1.0 + static_cast<double>(d + 2) * 0x1p-52)));
}

// The float32 kernel under TINYMEM_CPU_ISA=generic: multiply, round, add, round. Compiled for the
// baseline ISA (no FMA), so the compiler cannot fuse it, just like memscore.cpp's generic engine.
void exact_unfused(const float* h, const float* W, int64_t d, const int32_t* vs, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* w = W + static_cast<int64_t>(vs[i]) * d;
    float acc = 0.f;
    for (int64_t k = 0; k < d; ++k) acc = h[k] * w[k] + acc;
    out[i] = acc;
  }
}

struct Cand {
  int32_t v;
  float up;
};

// Screening state of one token row within one vocab segment.
struct alignas(64) RowState {
  float lvec[kLanes];  // lane-wise running max of lo; L = its max
  float L;             // a lower bound of the exact maximum (lags lvec between candidate hits)
  bool overflow;       // too many candidates: the row goes to the float32 kernel
  size_t cap;          // refilter the list when it reaches this size
  std::vector<Cand> cands;
};

struct Job {
  int64_t M, d, V, KP, P, T, S, TB;
  const uint32_t* hb;      // [M][KP] bf16 pairs of each token row (zeros for rows that fall back)
  const uint16_t* packed;  // [P][KP][32]
  const float* wn;         // [V]
  const float* bias;       // [V] or nullptr
  const float* alpha;      // [M] m (c hn + tau): the coefficient of wn in E
  const float* beta;       // [M] m (tau hn + tau0)
  RowState* st;            // [S][M]
  size_t max_cands;
};

void push_cand(RowState& s, int32_t v, float up, size_t max_cands) {
  if (s.overflow) return;
  s.cands.push_back(Cand{v, up});
  if (s.cands.size() < s.cap) return;
  const float L = s.L;
  s.cands.erase(std::remove_if(s.cands.begin(), s.cands.end(), [L](const Cand& c) { return !(c.up >= L); }),
                s.cands.end());
  if (s.cands.size() * 2 > s.cap) s.cap *= 2;  // near-ties everywhere: let the list grow, not thrash
  if (s.cap > max_cands) {
    s.overflow = true;
    std::vector<Cand>().swap(s.cands);
  }
}

// The exact stage reproduces the float32 kernel of the level in force: unfused under generic.
bool isa_is_generic() { return cpu_isa::chosen() == cpu_isa::kGeneric; }

#ifdef TINYMEM_HEAD_SCREEN_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")
namespace bf16_screen {

// The float32 kernel's logit for one (row, vocab id): the same sequential FMA chain from 0 over k that
// memscore_body.inc runs in every lane (and alone in target_logits). Eight independent chains at a time
// keep the FMA pipeline busy; each chain is still the sequential one.
void exact_fused(const float* h, const float* W, int64_t d, const int32_t* vs, int64_t n, float* out) {
  constexpr int64_t G = 8;
  for (int64_t i0 = 0; i0 < n; i0 += G) {
    const int64_t cnt = std::min(G, n - i0);
    const float* w[G];
    for (int64_t i = 0; i < G; ++i) w[i] = W + static_cast<int64_t>(vs[i0 + std::min(i, cnt - 1)]) * d;
    float acc[G] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t k = 0; k < d; ++k) {
      const float hk = h[k];
      for (int64_t i = 0; i < G; ++i) acc[i] = __builtin_fmaf(hk, w[i][k], acc[i]);
    }
    for (int64_t i = 0; i < cnt; ++i) out[i0 + i] = acc[i];
  }
}

// Rows [row0, row0 + R) x panels [p0, p0 + NC): bf16 logits by vdpbf16ps, then lo/up per logit, folded
// into each row's running L and candidate list (segment s).
template <int R, int NC>
void tile(const Job& j, int64_t row0, int64_t p0, int64_t s) {
  const int64_t KP = j.KP;
  const uint32_t* A = j.hb + row0 * KP;
  const uint16_t* B = j.packed + p0 * KP * 32;
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh b[NC];
    for (int c = 0; c < NC; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + (c * KP + kp) * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * KP + kp]));
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }

  const int64_t v0 = p0 * kLanes;
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const __m512 kabs = _mm512_set1_ps(0x1p-21f);
  __m512 bias[NC], wn[NC];
  __mmask16 valid[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t left = j.V - (v0 + c * kLanes);  // >= 1: a tile never starts past the last panel
    valid[c] = left >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    bias[c] = j.bias ? _mm512_maskz_loadu_ps(valid[c], j.bias + v0 + c * kLanes) : _mm512_setzero_ps();
    wn[c] = _mm512_maskz_loadu_ps(valid[c], j.wn + v0 + c * kLanes);
  }
  for (int r = 0; r < R; ++r) {
    RowState& st = j.st[s * j.M + row0 + r];
    const __m512 al = _mm512_set1_ps(j.alpha[row0 + r]), be = _mm512_set1_ps(j.beta[row0 + r]);
    __m512 up[NC];
    __m512 mx = ninf;
    for (int c = 0; c < NC; ++c) {
      const __m512 a = _mm512_add_ps(acc[r][c], bias[c]);
      const __m512 e = _mm512_fmadd_ps(kabs, _mm512_abs_ps(a), _mm512_fmadd_ps(al, wn[c], be));
      // padded columns: lo = -inf never raises L, up = NaN never passes up >= L
      mx = _mm512_max_ps(mx, _mm512_mask_blend_ps(valid[c], ninf, _mm512_sub_ps(a, e)));
      up[c] = _mm512_mask_blend_ps(valid[c], nan, _mm512_add_ps(a, e));
    }
    const __m512 lv = _mm512_max_ps(_mm512_load_ps(st.lvec), mx);
    _mm512_store_ps(st.lvec, lv);
    // screen against the lagging L first: on most tiles nothing passes and no horizontal max is needed
    __m512 Lb = _mm512_set1_ps(st.L);
    __mmask16 any = 0;
    for (int c = 0; c < NC; ++c) any |= _mm512_cmp_ps_mask(up[c], Lb, _CMP_GE_OQ);
    if (!any) continue;
    st.L = _mm512_reduce_max_ps(lv);
    Lb = _mm512_set1_ps(st.L);
    for (int c = 0; c < NC; ++c) {
      __mmask16 m = _mm512_cmp_ps_mask(up[c], Lb, _CMP_GE_OQ);
      if (!m) continue;
      alignas(64) float u[kLanes];
      _mm512_store_ps(u, up[c]);
      for (unsigned bits = m; bits; bits &= bits - 1) {
        const int i = __builtin_ctz(bits);
        push_cand(st, static_cast<int32_t>(v0 + c * kLanes + i), u[i], j.max_cands);
      }
    }
  }
}

template <int NC>
void tile_rows(const Job& j, int64_t rows, int64_t row0, int64_t p0, int64_t s) {
  switch (rows) {
    case 1: tile<1, NC>(j, row0, p0, s); break;
    case 2: tile<2, NC>(j, row0, p0, s); break;
    case 3: tile<3, NC>(j, row0, p0, s); break;
    case 4: tile<4, NC>(j, row0, p0, s); break;
    case 5: tile<5, NC>(j, row0, p0, s); break;
    default: tile<6, NC>(j, row0, p0, s); break;
  }
}

// Block b of token rows x segment s of the tiles. Tile outer: its 4 panels (d x 64 bf16) stay in L2
// while every row group of the block streams past them.
void work_item(const Job& j, int64_t b, int64_t s) {
  const int64_t g0 = b * j.TB, g1 = std::min(j.M, g0 + j.TB);
  const int64_t t0 = j.T * s / j.S, t1 = j.T * (s + 1) / j.S;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p0 = t * kTilePanels, np = std::min(kTilePanels, j.P - p0);
    for (int64_t r0 = g0; r0 < g1; r0 += kRows) {
      const int64_t rows = std::min(kRows, g1 - r0);
      switch (np) {
        case 1: tile_rows<1>(j, rows, r0, p0, s); break;
        case 2: tile_rows<2>(j, rows, r0, p0, s); break;
        case 3: tile_rows<3>(j, rows, r0, p0, s); break;
        default: tile_rows<4>(j, rows, r0, p0, s); break;
      }
    }
  }
}

float lvec_max(const RowState& st) { return _mm512_reduce_max_ps(_mm512_load_ps(st.lvec)); }

}  // namespace bf16_screen
#pragma GCC pop_options
#endif  // TINYMEM_HEAD_SCREEN_X86

}  // namespace

bool head_screen_supported() {
#ifdef TINYMEM_HEAD_SCREEN_X86
  return cpu_isa::best() >= cpu_isa::kAvx512Bf16;
#else
  return false;
#endif
}

bool head_screen_available() {
  return head_screen_supported() && cpu_isa::chosen() >= cpu_isa::kAvx512Bf16;
}

std::tuple<at::Tensor, at::Tensor> pack_head_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "pack_head_bf16: weight must be a float32 CPU tensor [V, d], got ", weight.scalar_type(), " ",
              weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.is_contiguous(), "pack_head_bf16: weight must be contiguous");
  const int64_t V = weight.size(0), d = weight.size(1);
  TORCH_CHECK(V > 0 && d > 0, "pack_head_bf16: weight is empty: ", weight.sizes());
  TORCH_CHECK(V <= std::numeric_limits<int32_t>::max(), "pack_head_bf16: vocabulary too large: ", V);
  const int64_t P = (V + kLanes - 1) / kLanes, KP = (d + 1) / 2;
  at::Tensor packed = at::empty({P, KP, 2 * kLanes}, weight.options().dtype(at::kBFloat16));
  at::Tensor wnorm = at::empty({V}, weight.options());
  const float* W = weight.data_ptr<float>();
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr());
  float* wn = wnorm.data_ptr<float>();
  // a panel is 16 vocab rows; in each 32-bit word the even k goes to the low half, as vdpbf16ps pairs them
  at::parallel_for(0, P, std::max<int64_t>(1, (int64_t{1} << 16) / (kLanes * d)), [&](int64_t a, int64_t e) {
    for (int64_t p = a; p < e; ++p) {
      uint32_t* o = out + p * KP * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t v = p * kLanes + l;
        if (v >= V) {
          for (int64_t kp = 0; kp < KP; ++kp) o[kp * kLanes + l] = 0;
          continue;
        }
        const float* row = W + v * d;
        for (int64_t kp = 0; kp < d / 2; ++kp)
          o[kp * kLanes + l] = bf16_bits(row[2 * kp]) | (bf16_bits(row[2 * kp + 1]) << 16);
        if (d % 2) o[(KP - 1) * kLanes + l] = bf16_bits(row[d - 1]);
        wn[v] = norm_up(row, d);
      }
    }
  });
  return {packed, wnorm};
}

at::Tensor lm_head_argmax_screened(const at::Tensor& hidden, const at::Tensor& weight,
                                   const at::Tensor& packed, const at::Tensor& wnorm,
                                   const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lm_head_argmax_screened";
  TORCH_CHECK(head_screen_supported(), op,
              ": this CPU has no AVX512-BF16 (check head_screen_available() first; lm_head_argmax gives the "
              "same result)");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), op,
              ": hidden and weight must be CPU tensors");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": hidden and weight must be float32, got ", hidden.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op,
              ": hidden must be [M, d] and weight [V, d], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), op, ": hidden and weight must be contiguous");
  const int64_t M = hidden.size(0), d = weight.size(1), V = weight.size(0);
  TORCH_CHECK(V > 0 && d > 0, op, ": weight is empty: ", weight.sizes());
  TORCH_CHECK(V <= std::numeric_limits<int32_t>::max(), op, ": vocabulary too large: ", V);
  const int64_t P = (V + kLanes - 1) / kLanes, KP = (d + 1) / 2;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.dim() == 3 && packed.size(0) == P && packed.size(1) == KP &&
                  packed.size(2) == 2 * kLanes,
              op, ": packed must be pack_head_bf16(weight): contiguous bfloat16 [", P, ", ", KP, ", ",
              2 * kLanes, "], got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(wnorm.device().is_cpu() && wnorm.scalar_type() == at::kFloat && wnorm.is_contiguous() &&
                  wnorm.dim() == 1 && wnorm.size(0) == V,
              op, ": wnorm must be pack_head_bf16(weight)'s float32 [", V, "], got ", wnorm.scalar_type(),
              " ", wnorm.sizes());
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == V,
                op, ": bias must be a float32 CPU tensor of shape [", V, "], got ", bias->scalar_type(), " ",
                bias->sizes());
    b32 = bias->contiguous();
  }
  const bool generic = isa_is_generic();  // also rejects a TINYMEM_CPU_ISA the float32 kernel rejects
  at::Tensor out = at::empty({M}, hidden.options().dtype(at::kLong));
  if (M == 0) return out;
  g_stats[0].fetch_add(1, std::memory_order_relaxed);

#ifdef TINYMEM_HEAD_SCREEN_X86
  const float* wn = wnorm.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  // whole-call fallbacks (see the header comment): n u in g(n, u) must stay far below 1, nothing may overflow
  bool call_ok = d < (int64_t{1} << 16);
  {
    int bad = 0;
    for (int64_t v = 0; v < V; ++v) bad |= !(wn[v] < static_cast<float>(kBig));
    if (bp)
      for (int64_t v = 0; v < V; ++v) bad |= !(std::fabs(bp[v]) < 0x1p126f || bp[v] == kNegInf);
    call_ok = call_ok && !bad;
  }
  if (!call_ok) {
    g_stats[3].fetch_add(M, std::memory_order_relaxed);
    return lm_head_argmax(hidden, weight, b32.defined() ? std::optional<at::Tensor>(b32) : std::nullopt, 0);
  }

  constexpr double u = 0x1p-24;
  auto g = [](double n, double unit) { return n * unit / (1.0 - n * unit); };
  const double dd = static_cast<double>(d);
  const double c = 0x1p-7 + 0x1p-15 + 1.01 * g(dd + 2, 2 * u) + g(dd + 1, u);
  const double tau = 0x1p-123 * std::sqrt(dd), tau0 = (dd + 8) * 0x1p-122, m = 1.0 + 0x1p-9;

  const float* H = hidden.data_ptr<float>();
  std::vector<uint32_t> hb(static_cast<size_t>(M * KP), 0u);
  std::vector<float> alpha(M, 0.f), beta(M, 0.f);
  std::vector<uint8_t> row_ok(M, 0);
  // O(M d) work: threads only for large M (each parallel region ends in a barrier, which on a loaded
  // machine waits for the slowest thread to be scheduled again)
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 18) / d), [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) {
      const float* h = H + r * d;
      bool finite = true;
      for (int64_t k = 0; k < d; ++k) finite &= std::isfinite(h[k]);
      if (!finite) continue;
      const float hn = norm_up(h, d);
      if (!(hn < kBig)) continue;
      row_ok[r] = 1;
      uint32_t* o = hb.data() + r * KP;
      for (int64_t kp = 0; kp < d / 2; ++kp) o[kp] = bf16_bits(h[2 * kp]) | (bf16_bits(h[2 * kp + 1]) << 16);
      if (d % 2) o[KP - 1] = bf16_bits(h[d - 1]);
      alpha[r] = round_up_f(m * (c * hn + tau));
      beta[r] = round_up_f(m * (tau * hn + tau0));
    }
  });

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  Job j;
  j.M = M;
  j.d = d;
  j.V = V;
  j.KP = KP;
  j.P = P;
  j.T = (P + kTilePanels - 1) / kTilePanels;
  const int64_t n_blocks = (M + kMaxBlockRows - 1) / kMaxBlockRows;
  j.TB = (M + n_blocks - 1) / n_blocks;
  j.TB = (j.TB + kRows - 1) / kRows * kRows;
  // few token blocks (decoding): split the vocabulary too, into a few segments per thread
  j.S = n_blocks >= 2 * threads ? 1 : std::max<int64_t>(1, std::min(4 * threads, j.T));
  j.hb = hb.data();
  j.packed = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  j.wn = wn;
  j.bias = bp;
  j.alpha = alpha.data();
  j.beta = beta.data();
  j.max_cands = static_cast<size_t>(std::max<int64_t>(4096, V / 4));
  std::vector<RowState> states(static_cast<size_t>(j.S * M));
  for (RowState& st : states) {
    std::fill(st.lvec, st.lvec + kLanes, kNegInf);
    st.L = kNegInf;
    st.overflow = false;
    st.cap = 32;
  }
  j.st = states.data();

  // Items are taken from a shared counter rather than split up front: a thread that the OS preempts
  // (a busy machine) then just takes fewer of them instead of holding everyone at the barrier.
  const int64_t n_items = ((M + j.TB - 1) / j.TB) * j.S;
  const int64_t work = M * KP * j.T * kTilePanels * kLanes;
  const int64_t workers = work < (int64_t{1} << 22) ? 1 : std::min(threads, n_items);
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t it = next.fetch_add(1, std::memory_order_relaxed); it < n_items;
         it = next.fetch_add(1, std::memory_order_relaxed))
      bf16_screen::work_item(j, it / j.S, it % j.S);
  };
  if (workers == 1) {
    worker();
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t a, int64_t e) {
      for (int64_t w = a; w < e; ++w) worker();
    });
  }

  // final L per row, the candidates that pass it, their exact logits; -1 marks a row for the float32 kernel
  int64_t* res = out.data_ptr<int64_t>();
  const float* W = weight.data_ptr<float>();
  std::atomic<int64_t> n_cands{0};
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 18) / d), [&](int64_t a, int64_t e) {
    std::vector<int32_t> ids;
    std::vector<float> x;
    int64_t local = 0;
    for (int64_t r = a; r < e; ++r) {
      res[r] = -1;
      if (!row_ok[r]) continue;
      float L = kNegInf;
      bool overflow = false;
      for (int64_t s = 0; s < j.S; ++s) {
        const RowState& st = states[s * M + r];
        L = std::max(L, bf16_screen::lvec_max(st));
        overflow |= st.overflow;
      }
      if (overflow || !std::isfinite(L)) continue;
      ids.clear();
      for (int64_t s = 0; s < j.S; ++s)  // segments in vocab order, lists in vocab order: ids ascend
        for (const Cand& cd : states[s * M + r].cands)
          if (cd.up >= L) ids.push_back(cd.v);
      if (ids.empty()) continue;  // cannot happen (the v that set L passes); the float32 kernel decides
      x.resize(ids.size());
      const float* h = H + r * d;
      if (generic) exact_unfused(h, W, d, ids.data(), static_cast<int64_t>(ids.size()), x.data());
      else bf16_screen::exact_fused(h, W, d, ids.data(), static_cast<int64_t>(ids.size()), x.data());
      float best = 0.f;
      int64_t arg = -1;
      for (size_t i = 0; i < ids.size(); ++i) {
        const float xi = x[i] + (bp ? bp[ids[i]] : 0.f);  // the kernel's bias add (zeros without a bias)
        if (arg < 0 || xi > best || (xi == best && ids[i] < arg)) {
          best = xi;
          arg = ids[i];
        }
      }
      res[r] = arg;
      local += static_cast<int64_t>(ids.size());
    }
    n_cands.fetch_add(local, std::memory_order_relaxed);
  });

  std::vector<int64_t> fb;
  for (int64_t r = 0; r < M; ++r)
    if (res[r] < 0) fb.push_back(r);
  g_stats[1].fetch_add(M - static_cast<int64_t>(fb.size()), std::memory_order_relaxed);
  g_stats[2].fetch_add(n_cands.load(), std::memory_order_relaxed);
  if (!fb.empty()) {
    g_stats[3].fetch_add(static_cast<int64_t>(fb.size()), std::memory_order_relaxed);
    // rows are independent in the float32 kernel, so scoring a subset gives each row its own answer
    const at::Tensor idx = at::from_blob(fb.data(), {static_cast<int64_t>(fb.size())}, at::kLong).clone();
    const at::Tensor sub = lm_head_argmax(hidden.index_select(0, idx).contiguous(), weight,
                                          b32.defined() ? std::optional<at::Tensor>(b32) : std::nullopt, 0);
    const int64_t* sp = sub.data_ptr<int64_t>();
    for (size_t i = 0; i < fb.size(); ++i) res[fb[i]] = sp[i];
  }
  return out;
#else
  (void)generic;
  TORCH_CHECK(false, op, ": needs an x86-64 CPU with AVX512-BF16");
  return out;
#endif
}

std::vector<int64_t> head_screen_stats(bool reset) {
  std::vector<int64_t> out(4);
  for (int i = 0; i < 4; ++i)
    out[i] = reset ? g_stats[i].exchange(0, std::memory_order_relaxed)
                   : g_stats[i].load(std::memory_order_relaxed);
  return out;
}

}  // namespace tinymem::cpu
