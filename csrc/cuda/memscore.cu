// CUDA kernel of the memscore ops (semantics: tinymem_fast/ops/memscore.py; interface:
// memscore_kernels.h). Only CUDA headers here; the torch side is memscore_cuda.cpp.
//
// A straightforward SIMT tiled kernel: a block of 256 threads owns 64 tokens and walks its vocabulary
// slice in 64-column tiles. For each tile, 64 x 32 slices of hidden and weight are staged in shared
// memory as float32 and every thread accumulates a 4 x 4 patch of logits with explicit fmaf over
// k = 0..D-1 in order (float32 accumulation, the same chain for every logit whatever the tiling). The
// epilogue adds the bias, rounds to the input dtype, and folds the tile into per-token running state:
// the 16 threads sharing a token row (a half-warp) combine their columns with xor-shuffles into the
// tile's max / lowest-index argmax / sum of exps, and every one of them keeps the row's state, so no
// shared memory or atomics are needed for the reductions. Nothing [M, V]-sized is ever stored.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "memscore_kernels.h"

namespace tinymem {
namespace gpu {
namespace memscore {
namespace {

constexpr int BM = static_cast<int>(kTileM);
constexpr int BN = static_cast<int>(kTileN);
constexpr int BK = 32;
constexpr int NT = 256;  // 16 x 16 threads, a 4 x 4 patch each
constexpr int RPT = 4;   // rows (and columns) per thread

enum Mode : int { kArgmax = 0, kNll = 1, kMatch = 2, kEarly = 3 };

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ __forceinline__ static float load(const float* p, int64_t i) { return p[i]; }
  __device__ __forceinline__ static float round(float x) { return x; }
};
template <>
struct Elem<__half> {
  __device__ __forceinline__ static float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  __device__ __forceinline__ static float round(float x) { return __half2float(__float2half_rn(x)); }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float load(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
  }
  __device__ __forceinline__ static float round(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
};

template <typename T, bool HAS_BIAS, int MODE>
__global__ void __launch_bounds__(NT)
    memscore_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                    const int64_t* __restrict__ targets, const float* __restrict__ thi, int64_t M, int64_t V,
                    int64_t D, int64_t v_per_split, float* __restrict__ best_out,
                    int32_t* __restrict__ arg_out, float* __restrict__ sum_out, float* __restrict__ tgt_out,
                    int8_t* __restrict__ dead_out) {
  constexpr bool kTargets = MODE != kArgmax;
  // stored k-major (As[k][row]) and padded by one so both the staging writes and the compute reads are
  // free of bank conflicts
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t v_lo = split * v_per_split;
  const int64_t v_hi = v_lo + v_per_split < V ? v_lo + v_per_split : V;

  float best[RPT], sum[RPT], tgt[RPT], tmax[RPT];
  int32_t arg[RPT];
  int64_t y[RPT];
  bool dead[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int64_t r = row0 + ty + 16 * i;
    best[i] = -INFINITY;
    sum[i] = 0.f;
    tgt[i] = 0.f;
    arg[i] = static_cast<int32_t>(v_lo);
    y[i] = (kTargets && r < M) ? targets[r] : -1;
    tmax[i] = (MODE == kEarly && r < M) ? thi[r] : 0.f;
    dead[i] = r >= M;  // padding rows never keep the block going
  }

  for (int64_t n0 = v_lo; n0 < v_hi; n0 += BN) {
    if constexpr (MODE == kEarly) {
      bool alive = false;
#pragma unroll
      for (int i = 0; i < RPT; ++i) alive |= !dead[i];
      if (!__syncthreads_or(alive)) break;  // every token of the block is a certain miss
    }
    float acc[RPT][RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i)
#pragma unroll
      for (int j = 0; j < RPT; ++j) acc[i][j] = 0.f;

    for (int64_t k0 = 0; k0 < D; k0 += BK) {
      __syncthreads();  // the previous slice is consumed
#pragma unroll
      for (int e = tid; e < BM * BK; e += NT) {
        const int r = e / BK, k = e % BK;
        const int64_t gr = row0 + r, gk = k0 + k;
        As[k][r] = (gr < M && gk < D) ? Elem<T>::load(hidden, gr * D + gk) : 0.f;
        const int64_t gc = n0 + r;  // BN == BM: the same index walks the weight tile
        Bs[k][r] = (gc < v_hi && gk < D) ? Elem<T>::load(weight, gc * D + gk) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < BK; ++k) {
        float a[RPT], b[RPT];
#pragma unroll
        for (int i = 0; i < RPT; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < RPT; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < RPT; ++i)
#pragma unroll
          for (int j = 0; j < RPT; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }

    // epilogue: bias, one rounding to the input dtype, invalid columns out of the running
    float bv[RPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
      const int64_t c = n0 + tx + 16 * j;
      bv[j] = (HAS_BIAS && c < v_hi) ? Elem<T>::load(bias, c) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      float x[RPT];
#pragma unroll
      for (int j = 0; j < RPT; ++j) {
        const int64_t c = n0 + tx + 16 * j;
        x[j] = c < v_hi ? Elem<T>::round(acc[i][j] + bv[j]) : -INFINITY;
      }
      // this thread's columns increase with j: strict > keeps the lowest index among its ties
      float m = x[0];
      int32_t a = static_cast<int32_t>(n0 + tx);
#pragma unroll
      for (int j = 1; j < RPT; ++j) {
        if (x[j] > m) {
          m = x[j];
          a = static_cast<int32_t>(n0 + tx + 16 * j);
        }
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {  // within the half-warp that shares this row
        const float om = __shfl_xor_sync(0xffffffffu, m, off);
        const int32_t oa = __shfl_xor_sync(0xffffffffu, a, off);
        if (om > m || (om == m && oa < a)) {
          m = om;
          a = oa;
        }
      }
      if constexpr (MODE == kNll) {
        // while every logit seen is -inf (suppressed ids) the sum stays 0: exp(-inf - -inf) would be NaN
        const float nb = fmaxf(best[i], m);
        const float sb = nb == -INFINITY ? 0.f : nb;
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < RPT; ++j) part += expf(x[j] - sb);
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        sum[i] = sum[i] * expf(best[i] - sb) + part;
#pragma unroll
        for (int j = 0; j < RPT; ++j)
          if (n0 + tx + 16 * j == y[i]) tgt[i] = x[j];  // one lane of the row holds it
      }
      if (m > best[i]) {  // strictly greater: earlier tiles hold lower indices
        best[i] = m;
        arg[i] = a;
      }
      if constexpr (MODE == kEarly) {
        if (m > tmax[i] || (m >= tmax[i] && a < y[i])) dead[i] = true;
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    float t = tgt[i];
    if constexpr (MODE == kNll) {
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
    }
    const int64_t r = row0 + ty + 16 * i;
    if (tx == 0 && r < M) {
      const int64_t o = split * M + r;
      best_out[o] = best[i];
      arg_out[o] = arg[i];
      if constexpr (MODE == kNll) {
        sum_out[o] = sum[i];
        tgt_out[o] = t;
      }
      if constexpr (MODE == kEarly) dead_out[o] = dead[i] ? 1 : 0;
    }
  }
}

template <typename T, bool HAS_BIAS, int MODE>
cudaError_t launch_typed(const void* hidden, const void* weight, const void* bias, const int64_t* targets,
                         const float* thi, int64_t M, int64_t V, int64_t D, int64_t v_per_split,
                         int64_t n_split, float* best, int32_t* arg, float* sum, float* tgt, int8_t* dead,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>(n_split));
  memscore_kernel<T, HAS_BIAS, MODE><<<grid, NT, 0, stream>>>(
      static_cast<const T*>(hidden), static_cast<const T*>(weight), static_cast<const T*>(bias), targets, thi,
      M, V, D, v_per_split, best, arg, sum, tgt, dead);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mode(bool has_bias, int mode, const void* hidden, const void* weight, const void* bias,
                        const int64_t* targets, const float* thi, int64_t M, int64_t V, int64_t D,
                        int64_t v_per_split, int64_t n_split, float* best, int32_t* arg, float* sum,
                        float* tgt, int8_t* dead, cudaStream_t stream) {
#define TINYMEM_MS_CASE(B, MD)                                                                            \
  if (has_bias == B && mode == MD)                                                                        \
    return launch_typed<T, B, MD>(hidden, weight, bias, targets, thi, M, V, D, v_per_split, n_split, best, \
                                  arg, sum, tgt, dead, stream);
  TINYMEM_MS_CASE(true, kArgmax)
  TINYMEM_MS_CASE(true, kNll)
  TINYMEM_MS_CASE(true, kMatch)
  TINYMEM_MS_CASE(true, kEarly)
  TINYMEM_MS_CASE(false, kArgmax)
  TINYMEM_MS_CASE(false, kNll)
  TINYMEM_MS_CASE(false, kMatch)
  TINYMEM_MS_CASE(false, kEarly)
#undef TINYMEM_MS_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t memscore_launch(const void* hidden, const void* weight, const void* bias, ElemType type,
                            const int64_t* targets, const float* thi, int64_t M, int64_t V, int64_t D,
                            int64_t v_per_split, int64_t n_split, bool need_nll, bool early_exit,
                            float* best, int32_t* arg, float* sum, float* tgt, int8_t* dead,
                            cudaStream_t stream) {
  if (M <= 0 || V <= 0 || D <= 0 || n_split <= 0 || v_per_split <= 0 || v_per_split % kTileN != 0 ||
      (need_nll && early_exit) || ((need_nll || early_exit) && targets == nullptr) ||
      (early_exit && thi == nullptr) || n_split > 65535)
    return cudaErrorInvalidValue;
  const int mode = targets == nullptr ? kArgmax : need_nll ? kNll : early_exit ? kEarly : kMatch;
  const bool has_bias = bias != nullptr;
  switch (type) {
    case ElemType::kFloat32:
      return launch_mode<float>(has_bias, mode, hidden, weight, bias, targets, thi, M, V, D, v_per_split,
                                n_split, best, arg, sum, tgt, dead, stream);
    case ElemType::kFloat16:
      return launch_mode<__half>(has_bias, mode, hidden, weight, bias, targets, thi, M, V, D, v_per_split,
                                 n_split, best, arg, sum, tgt, dead, stream);
    case ElemType::kBFloat16:
      return launch_mode<__nv_bfloat16>(has_bias, mode, hidden, weight, bias, targets, thi, M, V, D,
                                        v_per_split, n_split, best, arg, sum, tgt, dead, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memscore
}  // namespace gpu
}  // namespace tinymem
