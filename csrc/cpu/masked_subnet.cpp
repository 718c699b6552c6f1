// Masked subnet on the CPU. Semantics (tinymem_fast/ops/masked_subnet.py): flat entry i is dropped iff
// |s_i| < value or (|s_i| == value and i < cut); exactly k entries dropped, ties broken by flat index.
//
// The threshold is a two-pass radix select on the bit pattern of |s| as float32 (abs float bits order
// like the values), plus one pass to place the cut among ties: three streaming reads of the scores and
// no sort, no copy.
#include "masked_subnet.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace tinymem::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;
constexpr int kBins = 1 << 16;
constexpr uint32_t kInfBits = 0x7f800000u;

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

template <typename T>
inline uint32_t abs_key(T v) {
  float f = to_f(v);
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u & 0x7fffffffu;
}

inline float key_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16 (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same_shape(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), bn, " has shape ", b.sizes(), " but ", an, " has shape ", a.sizes());
}

// Histogram of the high 16 key bits, or (filter) of the low 16 bits of the keys whose high bits equal
// `prefix`. One private histogram per thread, merged afterwards: no atomics in the hot loop.
// Also counts NaNs (abs bits above +inf), which have no place in the order.
template <typename T>
std::vector<int64_t> histogram(const T* s, int64_t n, bool filter, uint32_t prefix, int64_t* nans) {
  const int nt = std::max(1, at::get_num_threads());
  std::vector<int64_t> per(static_cast<size_t>(nt) * kBins, 0);
  std::vector<int64_t> nan_per(nt, 0);
  const int64_t chunk = std::max<int64_t>(kGrain, (n + nt - 1) / nt);
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    const int tid = at::get_thread_num();
    int64_t* h = per.data() + static_cast<size_t>(tid) * kBins;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * chunk, hi = std::min(n, lo + chunk);
      if (!filter) {
        int64_t bad = 0;
        for (int64_t i = lo; i < hi; ++i) {
          const uint32_t u = abs_key(s[i]);
          h[u >> 16]++;
          bad += u > kInfBits;
        }
        nan_per[tid] += bad;
      } else {
        for (int64_t i = lo; i < hi; ++i) {
          const uint32_t u = abs_key(s[i]);
          if ((u >> 16) == prefix) h[u & 0xffffu]++;
        }
      }
    }
  });
  std::vector<int64_t> out(kBins, 0);
  for (int t = 0; t < nt; ++t) {
    for (int b = 0; b < kBins; ++b) out[b] += per[static_cast<size_t>(t) * kBins + b];
    if (nans) *nans += nan_per[t];
  }
  return out;
}

// Bin holding the rank-th smallest (1-based); `before` gets the count in lower bins.
int find_bin(const std::vector<int64_t>& h, int64_t rank, int64_t* before) {
  int64_t acc = 0;
  for (int b = 0; b < kBins; ++b) {
    if (acc + h[b] >= rank) {
      *before = acc;
      return b;
    }
    acc += h[b];
  }
  TORCH_CHECK(false, "internal error: rank beyond histogram");
}

// Small matrices (an MLP matrix of a small model is selected once per optimizer step, so this sits on the
// step's critical path): one thread, the keys copied once, a 16-bit radix pass over all keys and a second
// over those in the chosen bin, with one shared histogram of 32-bit counts -- about four streaming passes,
// several times faster than nth_element at 64K entries.
constexpr int64_t kSmall = 1 << 18;

template <typename T>
std::tuple<float, int64_t> threshold_small(const T* s, int64_t n, int64_t k) {
  std::vector<uint32_t> keys(n);
  uint32_t worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = abs_key(s[i]);
    worst = std::max(worst, keys[i]);
  }
  TORCH_CHECK(worst <= kInfBits, "scores contain NaN; the mask is undefined (did the loss diverge?)");
  std::vector<uint32_t> hist(kBins, 0);
  for (int64_t i = 0; i < n; ++i) hist[keys[i] >> 16]++;
  int64_t rank = k;  // 1-based rank of the k-th smallest key among those still in play
  uint32_t bhi = 0;
  for (;; ++bhi) {
    if (hist[bhi] >= rank) break;
    rank -= hist[bhi];
  }
  std::fill(hist.begin(), hist.end(), 0u);
  for (int64_t i = 0; i < n; ++i)
    if ((keys[i] >> 16) == bhi) hist[keys[i] & 0xffffu]++;
  uint32_t blo = 0;
  for (;; ++blo) {
    if (hist[blo] >= rank) break;
    rank -= hist[blo];
  }
  const uint32_t vkey = (bhi << 16) | blo;
  int64_t remaining = rank;  // ties of vkey still to drop, in index order
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] == vkey && --remaining == 0) return {key_to_float(vkey), i + 1};
  }
  TORCH_CHECK(false, "internal error: tie not found");
}

template <typename T>
std::tuple<float, int64_t> threshold_impl(const T* s, int64_t n, int64_t k) {
  if (n <= kSmall) return threshold_small(s, n, k);
  int64_t nans = 0;
  auto hi = histogram(s, n, false, 0, &nans);
  TORCH_CHECK(nans == 0, "scores contain NaN; the mask is undefined (did the loss diverge?)");
  int64_t below_hi = 0;
  const int bhi = find_bin(hi, k, &below_hi);
  auto lo = histogram(s, n, true, static_cast<uint32_t>(bhi), nullptr);
  int64_t below_lo = 0;
  const int blo = find_bin(lo, k - below_hi, &below_lo);
  const uint32_t vkey = (static_cast<uint32_t>(bhi) << 16) | static_cast<uint32_t>(blo);
  const int64_t need = k - below_hi - below_lo;  // ties of vkey to drop, >= 1

  // Place the cut: count ties per chunk in parallel, then walk to the chunk holding the need-th tie.
  const int64_t chunk = std::max<int64_t>(kGrain, (n + 63) / 64);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<int64_t> ties(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t cnt = 0;
      const int64_t a = c * chunk, b = std::min(n, a + chunk);
      for (int64_t i = a; i < b; ++i) cnt += abs_key(s[i]) == vkey;
      ties[c] = cnt;
    }
  });
  int64_t remaining = need;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (ties[c] < remaining) {
      remaining -= ties[c];
      continue;
    }
    const int64_t a = c * chunk, b = std::min(n, a + chunk);
    for (int64_t i = a; i < b; ++i) {
      if (abs_key(s[i]) == vkey && --remaining == 0) return {key_to_float(vkey), i + 1};
    }
  }
  TORCH_CHECK(false, "internal error: tie not found");
}

template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> subnet_threshold(const at::Tensor& scores, int64_t k) {
  check_float(scores, "scores");
  const int64_t n = scores.numel();
  TORCH_CHECK(n > 0, "scores is empty");
  TORCH_CHECK(k >= 0 && k < n, "k must be in [0, numel) = [0, ", n, "), got ", k);
  float value = 0.f;
  int64_t cut = 0;
  if (k > 0) {
    dispatch_float(scores.scalar_type(), "subnet_threshold", [&](auto tag) {
      using T = decltype(tag);
      std::tie(value, cut) = threshold_impl(scores.data_ptr<T>(), n, k);
    });
  }
  return {at::scalar_tensor(value, at::TensorOptions().dtype(at::kFloat)),
          at::scalar_tensor(cut, at::TensorOptions().dtype(at::kLong))};
}

at::Tensor subnet_masked_weight(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& value,
                                const at::Tensor& cut) {
  check_float(weight, "weight");
  check_float(scores, "scores");
  check_same_shape(weight, "weight", scores, "scores");
  TORCH_CHECK(value.numel() == 1 && cut.numel() == 1, "value and cut must hold one element each");
  const uint32_t vkey = abs_key(value.to(at::kCPU).to(at::kFloat).item<float>());
  const int64_t vcut = cut.to(at::kCPU).item<int64_t>();
  auto out = at::empty_like(weight);
  const int64_t n = weight.numel();
  dispatch_float(weight.scalar_type(), "subnet_masked_weight", [&](auto wtag) {
    using W = decltype(wtag);
    dispatch_float(scores.scalar_type(), "subnet_masked_weight", [&](auto stag) {
      using S = decltype(stag);
      const W* w = weight.data_ptr<W>();
      const S* s = scores.data_ptr<S>();
      W* o = out.data_ptr<W>();
      at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
        // Before `cut` ties are dropped, after it kept: split the range so the inner loops stay branch-light.
        const int64_t mid = std::clamp(vcut, a, b);
        for (int64_t i = a; i < mid; ++i) o[i] = abs_key(s[i]) > vkey ? w[i] : W(0);
        for (int64_t i = mid; i < b; ++i) o[i] = abs_key(s[i]) >= vkey ? w[i] : W(0);
      });
    });
  });
  return out;
}

at::Tensor subnet_ste_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores) {
  check_float(grad, "grad");
  check_float(weight, "weight");
  check_float(scores, "scores");
  check_same_shape(scores, "scores", grad, "grad");
  check_same_shape(scores, "scores", weight, "weight");
  auto out = at::empty_like(scores);
  const int64_t n = scores.numel();
  dispatch_float(grad.scalar_type(), "subnet_ste_grad", [&](auto gtag) {
    using G = decltype(gtag);
    dispatch_float(weight.scalar_type(), "subnet_ste_grad", [&](auto wtag) {
      using W = decltype(wtag);
      dispatch_float(scores.scalar_type(), "subnet_ste_grad", [&](auto stag) {
        using S = decltype(stag);
        const G* g = grad.data_ptr<G>();
        const W* w = weight.data_ptr<W>();
        const S* s = scores.data_ptr<S>();
        S* o = out.data_ptr<S>();
        at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
          for (int64_t i = a; i < b; ++i) {
            const float sv = to_f(s[i]);
            const float prod = to_f(g[i]) * to_f(w[i]);
            o[i] = static_cast<S>(sv > 0.f ? prod : (sv < 0.f ? -prod : 0.f));
          }
        });
      });
    });
  });
  return out;
}

void subnet_sgd_step_(at::Tensor& scores, const at::Tensor& grad, at::Tensor& momentum_buffer, double lr,
                      double momentum, double weight_decay, bool maximize) {
  check_float(scores, "scores");
  check_float(grad, "grad");
  TORCH_CHECK(momentum_buffer.scalar_type() == at::kFloat && momentum_buffer.is_contiguous() &&
                  momentum_buffer.device().is_cpu(),
              "momentum_buffer must be a contiguous float32 CPU tensor");
  check_same_shape(scores, "scores", grad, "grad");
  check_same_shape(scores, "scores", momentum_buffer, "momentum_buffer");
  const float flr = static_cast<float>(lr), fm = static_cast<float>(momentum);
  const float fwd = static_cast<float>(weight_decay), sign = maximize ? -1.f : 1.f;
  const int64_t n = scores.numel();
  float* buf = momentum_buffer.data_ptr<float>();
  dispatch_float(grad.scalar_type(), "subnet_sgd_step_", [&](auto gtag) {
    using G = decltype(gtag);
    dispatch_float(scores.scalar_type(), "subnet_sgd_step_", [&](auto stag) {
      using S = decltype(stag);
      const G* g = grad.data_ptr<G>();
      S* s = scores.data_ptr<S>();
      at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) {
          const float sv = to_f(s[i]);
          const float d = sign * to_f(g[i]) + fwd * sv;
          const float m = fm * buf[i] + d;
          buf[i] = m;
          s[i] = static_cast<S>(sv - flr * m);
        }
      });
    });
  });
}

}  // namespace tinymem::cpu
