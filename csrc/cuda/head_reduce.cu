// Reductions of the tensor-core memscore path (interface and slot layout: memscore_kernels.h; the
// cuBLAS GEMMs that produce the logits and the loop over blocks: memscore_cuda.cpp).
//
// Why this split: the head's arithmetic is a GEMM, and cuBLAS runs it on tensor cores at a rate no
// hand-written SIMT tile reaches, for one decoding row (a bandwidth-bound GEMV) as for thousands. The
// logits of one (rows x chunk) block land in a buffer bounded in size (never [M, V]); these kernels read
// it once and keep only per-(slice, row) partial records, which the merge folds. The logits are
// exactly what F.linear on the same device returns (the same cuBLAS call), so argmax ties break as a
// stock lm_head's do.
#include <cstdint>
#include <climits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "memscore_kernels.h"

namespace tinymem {
namespace gpu {
namespace memscore {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Vec;  // 16-byte loads: 8 halves / bfloat16s or 4 floats
template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void unpack(const uint4& u, float* x) {
    x[0] = __uint_as_float(u.x);
    x[1] = __uint_as_float(u.y);
    x[2] = __uint_as_float(u.z);
    x[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static float load(const float* p) { return *p; }
};
template <>
struct Vec<__half> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float* x) {
    const __half* h = reinterpret_cast<const __half*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __half2float(h[i]);
  }
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float* x) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __bfloat162float(h[i]);
  }
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
};

// Running (max, lowest index of the max, sum of exp(x - max)) of a sequence seen in increasing index
// order. -inf entries (suppressed ids) never win and add nothing; while the max is -inf the sum stays 0
// (exp(-inf - -inf) would be NaN).
struct Online {
  float m = -INFINITY;
  int32_t a = INT_MAX;
  float s = 0.f;

  __device__ __forceinline__ void push(float x, int32_t i) {
    if (x > m) {
      s = m == -INFINITY ? 0.f : s * expf(m - x);
      m = x;
      a = i;
    }
    if (x != -INFINITY) s += expf(x - m);
  }
  // o may come from anywhere: equal maxima keep the lower index
  __device__ __forceinline__ void merge(float om, int32_t oa, float os) {
    const float nm = fmaxf(m, om);
    if (nm != -INFINITY) {
      s = (m == -INFINITY ? 0.f : s * expf(m - nm)) + (om == -INFINITY ? 0.f : os * expf(om - nm));
    }
    if (om > m || (om == m && oa < a)) a = oa;
    m = nm;
  }
};

template <typename T, bool NLL>
__global__ void __launch_bounds__(kThreads)
    head_reduce_kernel(const T* __restrict__ logits, int64_t cols, int64_t col0, int64_t slice_cols,
                       const int64_t* __restrict__ targets, int64_t stride, float* __restrict__ best,
                       int32_t* __restrict__ arg, float* __restrict__ sum, float* __restrict__ tgt,
                       bool vector_ok) {
  const int64_t r = blockIdx.x;
  const int64_t slice = blockIdx.y;
  const int64_t lo = slice * slice_cols;
  const int64_t hi = lo + slice_cols < cols ? lo + slice_cols : cols;
  const T* row = logits + r * cols;
  const int tid = threadIdx.x;

  // each thread walks its columns in increasing order, so strict > keeps its lowest index of a max
  Online st;
  constexpr int N = Vec<T>::N;
  int64_t c = lo;
  if (vector_ok) {  // row and slice starts are 16-byte aligned (cols and slice_cols multiples of N)
    const int64_t n_vec = (hi - lo) / N;
    for (int64_t v = tid; v < n_vec; v += kThreads) {
      const int64_t c_v = lo + v * N;
      const uint4 u = *reinterpret_cast<const uint4*>(row + c_v);
      float x[N];
      Vec<T>::unpack(u, x);
#pragma unroll
      for (int e = 0; e < N; ++e) st.push(x[e], static_cast<int32_t>(col0 + c_v + e));
    }
    c = lo + n_vec * N;
  }
  for (int64_t i = c + tid; i < hi; i += kThreads) st.push(Vec<T>::load(row + i), static_cast<int32_t>(col0 + i));

#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, st.m, off);
    const int32_t oa = __shfl_xor_sync(0xffffffffu, st.a, off);
    const float os = __shfl_xor_sync(0xffffffffu, st.s, off);
    st.merge(om, oa, os);
  }
  __shared__ float sm[kWarps], ss[kWarps];
  __shared__ int32_t sa[kWarps];
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) {
    sm[warp] = st.m;
    sa[warp] = st.a;
    ss[warp] = st.s;
  }
  __syncthreads();
  if (tid == 0) {
    Online all;
    for (int w = 0; w < kWarps; ++w) all.merge(sm[w], sa[w], ss[w]);
    // a slice of -inf only: its lowest column stands for it (it never wins a merge against a finite max)
    if (all.a == INT_MAX) all.a = static_cast<int32_t>(col0 + lo);
    const int64_t o = slice * stride + r;
    best[o] = all.m;
    arg[o] = all.a;
    if constexpr (NLL) {
      sum[o] = all.s;
      const int64_t y = targets[r] - col0;  // the one slice that holds the target reports its logit
      tgt[o] = (y >= lo && y < hi) ? Vec<T>::load(row + y) : 0.f;
    }
  }
}

template <typename T>
cudaError_t reduce_typed(const void* logits, int64_t rows, int64_t cols, int64_t col0, int64_t slice_cols,
                         const int64_t* targets, bool need_nll, int64_t stride, float* best, int32_t* arg,
                         float* sum, float* tgt, cudaStream_t stream) {
  const int64_t n_slices = (cols + slice_cols - 1) / slice_cols;
  const bool vector_ok = cols % Vec<T>::N == 0 && slice_cols % Vec<T>::N == 0 &&
                         reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(n_slices));
  const T* p = static_cast<const T*>(logits);
  if (need_nll) {
    head_reduce_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, cols, col0, slice_cols, targets, stride, best,
                                                               arg, sum, tgt, vector_ok);
  } else {
    head_reduce_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, cols, col0, slice_cols, targets, stride,
                                                                best, arg, sum, tgt, vector_ok);
  }
  return cudaGetLastError();
}

__global__ void head_merge_kernel(const float* __restrict__ best, const int32_t* __restrict__ arg,
                                  const float* __restrict__ sum, const float* __restrict__ tgt,
                                  int64_t n_slots, int64_t M, const int64_t* __restrict__ targets,
                                  bool need_nll, int64_t* __restrict__ arg_out, bool* __restrict__ match_out,
                                  float* __restrict__ nll_out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= M) return;
  // slots hold increasing columns: strict > keeps the earliest slot's (lowest) index among equal maxima
  float top = best[r];
  int32_t a = arg[r];
  for (int64_t s = 1; s < n_slots; ++s) {
    const float b = best[s * M + r];
    if (b > top) {
      top = b;
      a = arg[s * M + r];
    }
  }
  if (arg_out != nullptr) arg_out[r] = a;
  if (match_out != nullptr) match_out[r] = targets[r] == a;
  if (need_nll && nll_out != nullptr) {
    float tot = 0.f, t = 0.f;
    for (int64_t s = 0; s < n_slots; ++s) {
      const float b = best[s * M + r];
      if (b != -INFINITY) tot += sum[s * M + r] * expf(b - top);
      t += tgt[s * M + r];
    }
    nll_out[r] = top + logf(tot) - t;
  }
}

}  // namespace

cudaError_t head_reduce_launch(const void* logits, ElemType type, int64_t rows, int64_t cols, int64_t col0,
                               int64_t slice_cols, const int64_t* targets, bool need_nll, int64_t stride,
                               float* best, int32_t* arg, float* sum, float* tgt, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || slice_cols <= 0 || col0 < 0 || col0 % slice_cols != 0 ||
      rows > INT_MAX || (cols + slice_cols - 1) / slice_cols > 65535 || col0 + cols > INT_MAX ||
      (need_nll && (targets == nullptr || sum == nullptr || tgt == nullptr)))
    return cudaErrorInvalidValue;
  switch (type) {
    case ElemType::kFloat32:
      return reduce_typed<float>(logits, rows, cols, col0, slice_cols, targets, need_nll, stride, best, arg,
                                 sum, tgt, stream);
    case ElemType::kFloat16:
      return reduce_typed<__half>(logits, rows, cols, col0, slice_cols, targets, need_nll, stride, best, arg,
                                  sum, tgt, stream);
    case ElemType::kBFloat16:
      return reduce_typed<__nv_bfloat16>(logits, rows, cols, col0, slice_cols, targets, need_nll, stride, best,
                                         arg, sum, tgt, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t head_merge_launch(const float* best, const int32_t* arg, const float* sum, const float* tgt,
                              int64_t n_slots, int64_t M, const int64_t* targets, bool need_nll,
                              int64_t* arg_out, bool* match_out, float* nll_out, cudaStream_t stream) {
  if (n_slots <= 0 || M <= 0 || (match_out != nullptr && targets == nullptr) ||
      (need_nll && (sum == nullptr || tgt == nullptr)))
    return cudaErrorInvalidValue;
  constexpr int threads = 256;
  const int64_t blocks = (M + threads - 1) / threads;
  head_merge_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(best, arg, sum, tgt, n_slots, M,
                                                                          targets, need_nll, arg_out,
                                                                          match_out, nll_out);
  return cudaGetLastError();
}

}  // namespace memscore
}  // namespace gpu
}  // namespace tinymem
