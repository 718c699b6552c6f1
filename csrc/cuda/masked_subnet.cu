// CUDA kernels of the masked-subnet ops (semantics: tinymem_fast/ops/masked_subnet.py).
//
// Only CUDA headers here: the torch side (checks, allocation, streams) is masked_subnet_cuda.cpp, which
// calls the launchers declared in masked_subnet_kernels.h with raw pointers.
//
// Numerics. The extension is built with --use_fast_math (-ftz=true -fmad=true), but these kernels must
// agree with the torch reference bit for bit, so
//   * every comparison of scores is an integer comparison of float32 bit patterns (|x| as float32 is
//     monotonic as uint32; unaffected by flush-to-zero of denormals);
//   * every float32 multiply/add is an explicit IEEE `mul.rn.f32` / `add.rn.f32` (no .ftz, never fused
//     into an FMA): the same roundings as torch's one-op-per-kernel reference;
//   * conversions go through the cuda_fp16/cuda_bf16 round-to-nearest-even intrinsics.
// NaN scores: undefined (the torch reference refuses them). In practice a NaN sorts above +inf in the
// selection and counts as "kept" in the elementwise kernels.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "masked_subnet_kernels.h"

namespace tinymem {
namespace gpu {
namespace {

using u64 = unsigned long long;  // the type CUDA's atomicAdd / __shfl_up_sync overloads take

// --- element types: tensors are read and written as raw bits --------------------------------------

struct F32 {
  using storage = uint32_t;
  __device__ __forceinline__ static float to_float(uint32_t b) { return __uint_as_float(b); }
  __device__ __forceinline__ static uint32_t from_float(float f) { return __float_as_uint(f); }
  // bits of |x| as float32
  __device__ __forceinline__ static uint32_t key(uint32_t b) { return b & 0x7fffffffu; }
  // bits of x * 0 (signed zero; NaN for inf/NaN), what torch's `weight * mask` gives where mask is 0
  __device__ __forceinline__ static uint32_t zero_like(uint32_t b) {
    return (b & 0x7f800000u) == 0x7f800000u ? 0x7fc00000u : (b & 0x80000000u);
  }
};

struct F16 {
  using storage = uint16_t;
  __device__ __forceinline__ static float to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ __forceinline__ static uint32_t from_float(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
  __device__ __forceinline__ static uint32_t key(uint32_t b) {
    return __float_as_uint(to_float(b)) & 0x7fffffffu;  // exact: float32 holds every float16
  }
  __device__ __forceinline__ static uint32_t zero_like(uint32_t b) {
    return (b & 0x7c00u) == 0x7c00u ? 0x7e00u : (b & 0x8000u);
  }
};

struct BF16 {
  using storage = uint16_t;
  __device__ __forceinline__ static float to_float(uint32_t b) { return __uint_as_float(b << 16); }
  __device__ __forceinline__ static uint32_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
  __device__ __forceinline__ static uint32_t key(uint32_t b) { return (b << 16) & 0x7fffffffu; }
  __device__ __forceinline__ static uint32_t zero_like(uint32_t b) {
    return (b & 0x7f80u) == 0x7f80u ? 0x7fc0u : (b & 0x8000u);
  }
};

// 8 consecutive elements at a 16-byte aligned address: one (16-bit types) or two (float32) 128-bit
// accesses. b[j] holds element j's bits in its low 16 or 32 bits.
template <typename T>
__device__ __forceinline__ void load8(const typename T::storage* p, uint32_t (&b)[8]) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
  if constexpr (sizeof(typename T::storage) == 4) {
    const uint4 a = q[0];
    const uint4 c = q[1];
    b[0] = a.x; b[1] = a.y; b[2] = a.z; b[3] = a.w;
    b[4] = c.x; b[5] = c.y; b[6] = c.z; b[7] = c.w;
  } else {
    const uint4 a = q[0];
    b[0] = a.x & 0xffffu; b[1] = a.x >> 16; b[2] = a.y & 0xffffu; b[3] = a.y >> 16;
    b[4] = a.z & 0xffffu; b[5] = a.z >> 16; b[6] = a.w & 0xffffu; b[7] = a.w >> 16;
  }
}

template <typename T>
__device__ __forceinline__ void store8(typename T::storage* p, const uint32_t (&b)[8]) {
  uint4* q = reinterpret_cast<uint4*>(p);
  if constexpr (sizeof(typename T::storage) == 4) {
    q[0] = make_uint4(b[0], b[1], b[2], b[3]);
    q[1] = make_uint4(b[4], b[5], b[6], b[7]);
  } else {
    q[0] = make_uint4((b[0] & 0xffffu) | (b[1] << 16), (b[2] & 0xffffu) | (b[3] << 16),
                      (b[4] & 0xffffu) | (b[5] << 16), (b[6] & 0xffffu) | (b[7] << 16));
  }
}

// --- IEEE float32 arithmetic, immune to -ftz / -fmad ----------------------------------------------

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float neg_exact(float a) {
  return __uint_as_float(__float_as_uint(a) ^ 0x80000000u);
}

// torch.sign on float32: (0 < x) - (x < 0), so 0 for +-0 and NaN
__device__ __forceinline__ float sign_of(float x) {
  const uint32_t b = __float_as_uint(x);
  const uint32_t a = b & 0x7fffffffu;
  if (a == 0u || a > 0x7f800000u) return 0.0f;
  return (b >> 31) ? -1.0f : 1.0f;
}

// entry kept <=> |s| > value or (|s| == value and index >= cut); keys are |x| float32 bit patterns
__device__ __forceinline__ bool keep_entry(uint32_t key, uint32_t value_key, int64_t i, int64_t cut) {
  return key > value_key || (key == value_key && i >= cut);
}

// --- block-wide exclusive scan (blockDim.x == NT, a multiple of 32, at most 1024) ------------------

template <int NT>
__device__ __forceinline__ u64 block_exclusive_scan(u64 v, u64* total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int kWarps = NT / 32;
  __shared__ u64 warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  u64 x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    u64 w = lane < kWarps ? warp_sums[lane] : 0ull;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_sums[lane] = w;  // inclusive scan of the warp totals
  }
  __syncthreads();
  const u64 before = warp == 0 ? 0ull : warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return before + x - v;
}

// --- launch geometry ------------------------------------------------------------------------------

constexpr int kEwThreads = 256;  // elementwise kernels
constexpr int kEwBlocksPerSm = 8;

int sm_count() {
  int dev = 0;
  int n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}

unsigned int grid_for(int64_t units, int threads, int64_t max_blocks) {
  int64_t b = (units + threads - 1) / threads;
  if (b > max_blocks) b = max_blocks;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename Fn>
cudaError_t dispatch_type(FloatType t, Fn&& fn) {
  switch (t) {
    case FloatType::kFloat32: return fn(F32{});
    case FloatType::kFloat16: return fn(F16{});
    case FloatType::kBFloat16: return fn(BF16{});
  }
  return cudaErrorInvalidValue;
}

// =================================================================================================
// subnet_threshold: radix select over the 31-bit key |x| (bit 31 of the float32 bits of |x| is 0).
//
// Ordering entries by (key asc, flat index asc), the k-th one (1-based) has key `value`; `need` of the
// entries with key == value are dropped, need = k - #(key < value), and cut = 1 + flat index of the
// need-th such tie in index order.
//
// Digits, most significant first: 13 bits (30..18), 9 bits (17..9), 9 bits (8..0). For each digit a
// histogram pass counts the entries that match the already chosen higher digits (per-block shared
// memory histogram, flushed with atomicAdd to global), then a single-block pick kernel finds the bin
// holding the rank still sought and narrows `prefix` / `remaining`. After the last digit,
// prefix = value and remaining = need. float16 and bfloat16 keys have bits 12..0 zero, so they skip
// the last digit. Then: per-chunk tie counts, a single-block scan that finds the chunk holding the
// need-th tie, and a single-block kernel that finds its index inside that chunk.
// All state stays on the device; nothing waits on the host.
// =================================================================================================

constexpr int kD1Bits = 13, kD1Shift = 18;
constexpr int kD2Bits = 9, kD2Shift = 9;
constexpr int kD3Bits = 9, kD3Shift = 0;
static_assert(kD1Shift + kD1Bits == 31 && kD2Shift + kD2Bits == kD1Shift &&
                  kD3Shift + kD3Bits == kD2Shift && kD3Shift == 0,
              "digits must tile key bits 30..0");
static_assert(kD3Bits <= 13, "float16/bfloat16 keys have bits 12..0 zero: the last digit is skipped");

constexpr int kHistThreads = 256;
constexpr int kPickThreads = 512;
constexpr int kTieChunk = 8192;  // entries per tie-count block
constexpr int kTieThreads = 256;
constexpr int kLocateThreads = 1024;
constexpr int kLocatePer = 8;  // chunk counts per thread per round of the locate kernel
constexpr int kFindThreads = 256;
constexpr int kFindPer = kTieChunk / kFindThreads;
static_assert(kTieChunk % kFindThreads == 0 && kTieChunk % 8 == 0, "tie chunk geometry");

struct SelectState {
  u64 remaining;   // 1-based rank sought among the entries matching `prefix` on the chosen digits
  u64 tie_chunk;   // chunk holding the need-th tie
  u64 tie_need;    // its 1-based rank among the ties of that chunk
  uint32_t prefix; // key bits chosen so far (the full value key after the last digit)
  uint32_t pad;
};

// workspace: [state | 256 B][hist D1 | 8192 u64][hist D2 | 512 u64][hist D3 | 512 u64][chunk counts]
constexpr int64_t kStateBytes = 256;
constexpr int kHistWords = (1 << kD1Bits) + (1 << kD2Bits) + (1 << kD3Bits);
static_assert(sizeof(SelectState) <= kStateBytes, "state fits its slot");

int64_t num_tie_chunks(int64_t n) { return (n + kTieChunk - 1) / kTieChunk; }

__global__ void select_init_kernel(SelectState* st, u64* hist, int nhist, u64 k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < nhist) hist[i] = 0ull;
  if (i == 0) {
    st->remaining = k;
    st->tie_chunk = 0ull;
    st->tie_need = 0ull;
    st->prefix = 0u;
    st->pad = 0u;
  }
}

template <typename T, int BITS>
__device__ __forceinline__ void hist_add(unsigned int* sh, uint32_t bits, int hi_shift, uint32_t want,
                                         int shift) {
  const uint32_t key = T::key(bits);
  if ((key >> hi_shift) == want) atomicAdd(&sh[(key >> shift) & ((1u << BITS) - 1u)], 1u);
}

// Histogram of digit (key >> shift) & (2^BITS - 1) over the entries whose higher digits equal the
// prefix chosen so far. Shared counters are 32-bit: the launcher keeps each block under 2^31 entries.
template <typename T, int BITS>
__global__ void __launch_bounds__(kHistThreads)
radix_hist_kernel(const typename T::storage* __restrict__ x, int64_t n, int shift,
                  const SelectState* __restrict__ st, u64* __restrict__ ghist, bool vec) {
  constexpr int kBins = 1 << BITS;
  __shared__ unsigned int sh[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) sh[b] = 0u;
  __syncthreads();

  const int hi_shift = shift + BITS;  // <= 31
  const uint32_t want = st->prefix >> hi_shift;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t nv = n / 8;
    for (int64_t v = tid; v < nv; v += stride) {
      uint32_t b[8];
      load8<T>(x + v * 8, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) hist_add<T, BITS>(sh, b[j], hi_shift, want, shift);
    }
    tail = nv * 8;
  }
  for (int64_t i = tail + tid; i < n; i += stride) hist_add<T, BITS>(sh, x[i], hi_shift, want, shift);
  __syncthreads();

  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    const unsigned int c = sh[b];
    if (c != 0u) atomicAdd(&ghist[b], static_cast<u64>(c));
  }
}

// Single block: finds the bin holding rank `remaining`, appends it to `prefix` and makes `remaining`
// relative to that bin. Invariant: 1 <= remaining <= sum(hist), so exactly one thread finds it.
template <int BITS>
__global__ void __launch_bounds__(kPickThreads)
radix_pick_kernel(const u64* __restrict__ ghist, int shift, SelectState* st) {
  constexpr int kBins = 1 << BITS;
  static_assert(kBins % kPickThreads == 0, "bins per thread");
  constexpr int kPer = kBins / kPickThreads;
  __shared__ u64 s_rem;
  if (threadIdx.x == 0) s_rem = st->remaining;
  __syncthreads();
  const u64 rem = s_rem;

  const int b0 = threadIdx.x * kPer;
  u64 local = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) local += ghist[b0 + j];
  u64 total;
  const u64 excl = block_exclusive_scan<kPickThreads>(local, &total);
  if (excl < rem && rem <= excl + local) {
    u64 c = excl;
    for (int j = 0; j < kPer; ++j) {
      const u64 h = ghist[b0 + j];
      if (c + h >= rem) {
        st->prefix |= static_cast<uint32_t>(b0 + j) << shift;
        st->remaining = rem - c;
        break;
      }
      c += h;
    }
  }
}

// Number of entries with key == value in each chunk of kTieChunk entries (one block per chunk).
template <typename T>
__global__ void __launch_bounds__(kTieThreads)
tie_count_kernel(const typename T::storage* __restrict__ x, int64_t n,
                 const SelectState* __restrict__ st, unsigned int* __restrict__ counts, bool vec) {
  const uint32_t value = st->prefix;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kTieChunk;
  const int64_t end = (n - start < kTieChunk) ? n : start + kTieChunk;
  unsigned int cnt = 0u;
  int64_t tail = start;
  if (vec) {  // start is a multiple of 8 entries, so start + 8 v stays 16-byte aligned
    const int64_t nv = (end - start) / 8;
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      uint32_t b[8];
      load8<T>(x + start + v * 8, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) cnt += T::key(b[j]) == value ? 1u : 0u;
    }
    tail = start + nv * 8;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) cnt += T::key(x[i]) == value ? 1u : 0u;
  u64 total;
  block_exclusive_scan<kTieThreads>(cnt, &total);
  if (threadIdx.x == 0) counts[blockIdx.x] = static_cast<unsigned int>(total);
}

// Single block: scans the chunk counts to find the chunk holding the need-th tie (need = remaining).
__global__ void __launch_bounds__(kLocateThreads)
tie_locate_kernel(const unsigned int* __restrict__ counts, int64_t nchunks, SelectState* st) {
  __shared__ u64 s_need;
  __shared__ int s_found;
  if (threadIdx.x == 0) {
    s_need = st->remaining;
    s_found = 0;
  }
  __syncthreads();
  const u64 need = s_need;
  u64 carry = 0;
  for (int64_t base = 0; base < nchunks; base += static_cast<int64_t>(kLocateThreads) * kLocatePer) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kLocatePer;
    u64 local = 0;
#pragma unroll
    for (int j = 0; j < kLocatePer; ++j) local += (i0 + j < nchunks) ? counts[i0 + j] : 0u;
    u64 total;
    const u64 excl = carry + block_exclusive_scan<kLocateThreads>(local, &total);
    if (excl < need && need <= excl + local) {
      u64 c = excl;
      for (int j = 0; j < kLocatePer; ++j) {
        const u64 h = counts[i0 + j];  // i0 + j < nchunks: the sought tie lies in a real chunk
        if (c + h >= need) {
          st->tie_chunk = static_cast<u64>(i0 + j);
          st->tie_need = need - c;
          break;
        }
        c += h;
      }
      s_found = 1;
    }
    __syncthreads();
    if (s_found) break;  // block-uniform
    carry += total;
  }
}

// Single block: index of the tie_need-th tie inside chunk tie_chunk -> cut; also writes value.
template <typename T>
__global__ void __launch_bounds__(kFindThreads)
tie_find_kernel(const typename T::storage* __restrict__ x, int64_t n,
                const SelectState* __restrict__ st, float* __restrict__ value_out,
                int64_t* __restrict__ cut_out) {
  const uint32_t value = st->prefix;
  const int64_t start = static_cast<int64_t>(st->tie_chunk) * kTieChunk;
  const u64 need = st->tie_need;
  const int64_t s0 = start + static_cast<int64_t>(threadIdx.x) * kFindPer;
  const int64_t s1 = (n - s0 < kFindPer) ? n : s0 + kFindPer;  // empty when s0 >= n
  unsigned int cnt = 0u;
  for (int64_t i = s0; i < s1; ++i) cnt += T::key(x[i]) == value ? 1u : 0u;
  u64 total;
  const u64 excl = block_exclusive_scan<kFindThreads>(cnt, &total);
  if (excl < need && need <= excl + cnt) {
    u64 r = excl;
    for (int64_t i = s0; i < s1; ++i) {
      if (T::key(x[i]) == value && ++r == need) {
        *cut_out = i + 1;
        break;
      }
    }
  }
  if (threadIdx.x == 0) *value_out = __uint_as_float(value);
}

template <typename T>
cudaError_t threshold_impl(const typename T::storage* x, int64_t n, int64_t k, void* workspace,
                           float* value_out, int64_t* cut_out, cudaStream_t stream) {
  if (n <= 0 || k < 1 || k >= n) return cudaErrorInvalidValue;
  const int64_t nchunks = num_tie_chunks(n);
  if (nchunks > 0x7fffffffLL) return cudaErrorInvalidValue;  // gridDim.x limit (n >= 2^44)

  char* base = static_cast<char*>(workspace);
  SelectState* st = reinterpret_cast<SelectState*>(base);
  u64* hist1 = reinterpret_cast<u64*>(base + kStateBytes);
  u64* hist2 = hist1 + (1 << kD1Bits);
  u64* hist3 = hist2 + (1 << kD2Bits);
  unsigned int* counts = reinterpret_cast<unsigned int*>(hist3 + (1 << kD3Bits));

  const bool vec = aligned16(x);
  const int64_t units = vec ? (n / 8 > 0 ? n / 8 : 1) : n;
  const int sms = sm_count();
  // at least enough blocks that none counts 2^31 entries or more in its 32-bit shared counters
  const int64_t min_blocks = (n >> 31) + 1;
  auto hist_grid = [&](const void* kernel) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kHistThreads, 0) != cudaSuccess ||
        per_sm < 1)
      per_sm = 1;
    const int64_t cap = static_cast<int64_t>(sms) * per_sm;
    unsigned int g = grid_for(units, kHistThreads, cap > min_blocks ? cap : min_blocks);
    return g;
  };

  select_init_kernel<<<(kHistWords + 255) / 256, 256, 0, stream>>>(st, hist1, kHistWords,
                                                                   static_cast<u64>(k));

  radix_hist_kernel<T, kD1Bits>
      <<<hist_grid(reinterpret_cast<const void*>(&radix_hist_kernel<T, kD1Bits>)), kHistThreads, 0,
         stream>>>(x, n, kD1Shift, st, hist1, vec);
  radix_pick_kernel<kD1Bits><<<1, kPickThreads, 0, stream>>>(hist1, kD1Shift, st);

  radix_hist_kernel<T, kD2Bits>
      <<<hist_grid(reinterpret_cast<const void*>(&radix_hist_kernel<T, kD2Bits>)), kHistThreads, 0,
         stream>>>(x, n, kD2Shift, st, hist2, vec);
  radix_pick_kernel<kD2Bits><<<1, kPickThreads, 0, stream>>>(hist2, kD2Shift, st);

  if constexpr (sizeof(typename T::storage) == 4) {  // 16-bit types: last digit is always 0
    radix_hist_kernel<T, kD3Bits>
        <<<hist_grid(reinterpret_cast<const void*>(&radix_hist_kernel<T, kD3Bits>)), kHistThreads, 0,
           stream>>>(x, n, kD3Shift, st, hist3, vec);
    radix_pick_kernel<kD3Bits><<<1, kPickThreads, 0, stream>>>(hist3, kD3Shift, st);
  }

  tie_count_kernel<T><<<static_cast<unsigned int>(nchunks), kTieThreads, 0, stream>>>(x, n, st, counts,
                                                                                       vec);
  tie_locate_kernel<<<1, kLocateThreads, 0, stream>>>(counts, nchunks, st);
  tie_find_kernel<T><<<1, kFindThreads, 0, stream>>>(x, n, st, value_out, cut_out);
  return cudaGetLastError();
}

// =================================================================================================
// Elementwise kernels: grid-stride loops over groups of 8 entries (128-bit accesses) when every
// pointer is 16-byte aligned, then a scalar tail; scalar throughout otherwise.
// =================================================================================================

template <typename TW, typename TS>
__global__ void __launch_bounds__(kEwThreads)
masked_weight_kernel(const typename TW::storage* __restrict__ w, const typename TS::storage* __restrict__ s,
                     const float* __restrict__ value, const int64_t* __restrict__ cut,
                     typename TW::storage* __restrict__ out, int64_t n, bool vec) {
  // value >= 0 as subnet_threshold produces it; -0.0 is read as +0.0
  const uint32_t vkey = __float_as_uint(*value) & 0x7fffffffu;
  const int64_t c = *cut;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t nv = n / 8;
    for (int64_t v = tid; v < nv; v += stride) {
      const int64_t i0 = v * 8;
      uint32_t wb[8], sb[8];
      load8<TW>(w + i0, wb);
      load8<TS>(s + i0, sb);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        wb[j] = keep_entry(TS::key(sb[j]), vkey, i0 + j, c) ? wb[j] : TW::zero_like(wb[j]);
      store8<TW>(out + i0, wb);
    }
    tail = nv * 8;
  }
  for (int64_t i = tail + tid; i < n; i += stride) {
    const uint32_t wb = w[i];
    out[i] = static_cast<typename TW::storage>(keep_entry(TS::key(s[i]), vkey, i, c) ? wb
                                                                                     : TW::zero_like(wb));
  }
}

template <typename TG, typename TW, typename TS>
__device__ __forceinline__ uint32_t ste_one(uint32_t gb, uint32_t wb, uint32_t sb) {
  const float p = mul_rn(TG::to_float(gb), TW::to_float(wb));
  return TS::from_float(mul_rn(p, sign_of(TS::to_float(sb))));
}

template <typename TG, typename TW, typename TS>
__global__ void __launch_bounds__(kEwThreads)
ste_grad_kernel(const typename TG::storage* __restrict__ g, const typename TW::storage* __restrict__ w,
                const typename TS::storage* __restrict__ s, typename TS::storage* __restrict__ out,
                int64_t n, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t nv = n / 8;
    for (int64_t v = tid; v < nv; v += stride) {
      const int64_t i0 = v * 8;
      uint32_t gb[8], wb[8], sb[8];
      load8<TG>(g + i0, gb);
      load8<TW>(w + i0, wb);
      load8<TS>(s + i0, sb);
#pragma unroll
      for (int j = 0; j < 8; ++j) sb[j] = ste_one<TG, TW, TS>(gb[j], wb[j], sb[j]);
      store8<TS>(out + i0, sb);
    }
    tail = nv * 8;
  }
  for (int64_t i = tail + tid; i < n; i += stride)
    out[i] = static_cast<typename TS::storage>(ste_one<TG, TW, TS>(g[i], w[i], s[i]));
}

// One SGD update with torch's rounding order: g = grad (+-); g = g + wd*s; buf = buf*m + g; s = s - lr*buf
template <typename TS, typename TG>
__device__ __forceinline__ void sgd_one(uint32_t& sb, uint32_t gb, uint32_t& bb, float lr, float momentum,
                                        float weight_decay, bool maximize) {
  const float s = TS::to_float(sb);
  float g = TG::to_float(gb);
  if (maximize) g = neg_exact(g);
  g = add_rn(g, mul_rn(weight_decay, s));
  const float buf = add_rn(mul_rn(__uint_as_float(bb), momentum), g);
  bb = __float_as_uint(buf);
  sb = TS::from_float(sub_rn(s, mul_rn(lr, buf)));
}

template <typename TS, typename TG>
__global__ void __launch_bounds__(kEwThreads)
sgd_step_kernel(typename TS::storage* __restrict__ s, const typename TG::storage* __restrict__ g,
                uint32_t* __restrict__ buf, int64_t n, float lr, float momentum, float weight_decay,
                bool maximize, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t nv = n / 8;
    for (int64_t v = tid; v < nv; v += stride) {
      const int64_t i0 = v * 8;
      uint32_t sb[8], gb[8], bb[8];
      load8<TS>(s + i0, sb);
      load8<TG>(g + i0, gb);
      load8<F32>(buf + i0, bb);
#pragma unroll
      for (int j = 0; j < 8; ++j) sgd_one<TS, TG>(sb[j], gb[j], bb[j], lr, momentum, weight_decay, maximize);
      store8<TS>(s + i0, sb);
      store8<F32>(buf + i0, bb);
    }
    tail = nv * 8;
  }
  for (int64_t i = tail + tid; i < n; i += stride) {
    uint32_t sb = s[i];
    uint32_t bb = buf[i];
    sgd_one<TS, TG>(sb, g[i], bb, lr, momentum, weight_decay, maximize);
    s[i] = static_cast<typename TS::storage>(sb);
    buf[i] = bb;
  }
}

unsigned int ew_grid(int64_t n, bool vec) {
  const int64_t units = vec ? n / 8 + (n % 8) : n;
  return grid_for(units, kEwThreads, static_cast<int64_t>(sm_count()) * kEwBlocksPerSm);
}

}  // namespace

// --- launchers ------------------------------------------------------------------------------------

int64_t subnet_threshold_workspace_bytes(int64_t n) {
  return kStateBytes + static_cast<int64_t>(sizeof(u64)) * kHistWords +
         static_cast<int64_t>(sizeof(unsigned int)) * num_tie_chunks(n > 0 ? n : 1);
}

cudaError_t subnet_threshold_launch(const void* scores, FloatType scores_type, int64_t n, int64_t k,
                                    void* workspace, float* value_out, int64_t* cut_out,
                                    cudaStream_t stream) {
  return dispatch_type(scores_type, [&](auto tag) {
    using T = decltype(tag);
    return threshold_impl<T>(static_cast<const typename T::storage*>(scores), n, k, workspace, value_out,
                             cut_out, stream);
  });
}

cudaError_t subnet_masked_weight_launch(const void* weight, FloatType weight_type, const void* scores,
                                        FloatType scores_type, const float* value, const int64_t* cut,
                                        void* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(weight) && aligned16(scores) && aligned16(out);
  const unsigned int grid = ew_grid(n, vec);
  return dispatch_type(weight_type, [&](auto wtag) {
    return dispatch_type(scores_type, [&](auto stag) {
      using TW = decltype(wtag);
      using TS = decltype(stag);
      masked_weight_kernel<TW, TS><<<grid, kEwThreads, 0, stream>>>(
          static_cast<const typename TW::storage*>(weight), static_cast<const typename TS::storage*>(scores),
          value, cut, static_cast<typename TW::storage*>(out), n, vec);
      return cudaGetLastError();
    });
  });
}

cudaError_t subnet_ste_grad_launch(const void* grad, FloatType grad_type, const void* weight,
                                   FloatType weight_type, const void* scores, FloatType scores_type,
                                   void* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(grad) && aligned16(weight) && aligned16(scores) && aligned16(out);
  const unsigned int grid = ew_grid(n, vec);
  return dispatch_type(grad_type, [&](auto gtag) {
    return dispatch_type(weight_type, [&](auto wtag) {
      return dispatch_type(scores_type, [&](auto stag) {
        using TG = decltype(gtag);
        using TW = decltype(wtag);
        using TS = decltype(stag);
        ste_grad_kernel<TG, TW, TS><<<grid, kEwThreads, 0, stream>>>(
            static_cast<const typename TG::storage*>(grad), static_cast<const typename TW::storage*>(weight),
            static_cast<const typename TS::storage*>(scores), static_cast<typename TS::storage*>(out), n,
            vec);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t subnet_sgd_step_launch(void* scores, FloatType scores_type, const void* grad,
                                   FloatType grad_type, float* momentum_buffer, int64_t n, float lr,
                                   float momentum, float weight_decay, bool maximize,
                                   cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(scores) && aligned16(grad) && aligned16(momentum_buffer);
  const unsigned int grid = ew_grid(n, vec);
  return dispatch_type(scores_type, [&](auto stag) {
    return dispatch_type(grad_type, [&](auto gtag) {
      using TS = decltype(stag);
      using TG = decltype(gtag);
      sgd_step_kernel<TS, TG><<<grid, kEwThreads, 0, stream>>>(
          static_cast<typename TS::storage*>(scores), static_cast<const typename TG::storage*>(grad),
          reinterpret_cast<uint32_t*>(momentum_buffer), n, lr, momentum, weight_decay, maximize, vec);
      return cudaGetLastError();
    });
  });
}

}  // namespace gpu
}  // namespace tinymem
