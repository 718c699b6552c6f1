// Launchers of the memscore CUDA kernels (csrc/cuda/memscore.cu: SIMT tiles; csrc/cuda/head_reduce.cu:
// the reductions of the cuBLAS path).
//
// Plain C++: raw device pointers, int64 sizes and a dtype code, so the torch-facing code
// (memscore_cuda.cpp) and the kernel (compiled by nvcc without any torch header) share only this.
// The launcher enqueues its work on `stream`, never synchronises with the host, and returns the first
// CUDA error it saw.
//
// Semantics: tinymem_fast/ops/memscore.py. For token m and vocab slice s (columns
// [s * v_per_split, min(V, (s + 1) * v_per_split))) the kernel writes, at index s * M + m:
//   best  max over the slice of logit = round_to_dtype(fp32(hidden[m] . weight[v]) + bias[v])
//   arg   lowest column index reaching `best` (int32)
//   sum   sum over the slice of exp(logit - best)                         (need_nll only)
//   tgt   logit of column targets[m] if it lies in the slice, else 0      (need_nll only)
//   dead  1 once some column provably beats the target (early_exit only): logit > thi[m], or
//         logit >= thi[m] at a column below targets[m]; the slice may then stop early, leaving best /
//         arg partial for that token (it is a miss whatever they are)
// The host merges the slices (max, lowest index among equal maxima, rescaled sums).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tinymem {
namespace gpu {
namespace memscore {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// vocabulary columns per tile; v_per_split must be a positive multiple of it
constexpr int64_t kTileN = 64;
// tokens per thread block
constexpr int64_t kTileM = 64;

// hidden [M, D], weight [V, D], bias [V] (or nullptr), all of `type`; targets [M] int64 in [0, V) or
// nullptr (argmax only); thi [M] float32 (early_exit only). grid: ceil(M / kTileM) x n_split.
cudaError_t memscore_launch(const void* hidden, const void* weight, const void* bias, ElemType type,
                            const int64_t* targets, const float* thi, int64_t M, int64_t V, int64_t D,
                            int64_t v_per_split, int64_t n_split, bool need_nll, bool early_exit,
                            float* best, int32_t* arg, float* sum, float* tgt, int8_t* dead,
                            cudaStream_t stream);


// --- the tensor-core path: cuBLAS computes the logits of (rows x chunk) blocks, these reduce them ---
//
// Slots: the vocabulary is cut into slices of `slice_cols` columns (slot s holds columns
// [s * slice_cols, (s + 1) * slice_cols)); every (slot, row) gets one partial record in arrays laid out
// [n_slots, M]: best / arg / sum / tgt exactly as memscore_launch's slices above.

// logits: rows x cols of `type`, row-major with leading dimension `cols`, holding vocabulary columns
// [col0, col0 + cols) of rows [r0, r0 + rows); col0 and (unless it is the last block) cols are multiples
// of slice_cols. targets (or nullptr): the rows' targets, already offset to r0. best/arg/sum/tgt point at
// slot col0 / slice_cols, row r0 (sum and tgt only when need_nll); `stride` is M, the distance between
// slots. grid: rows x ceil(cols / slice_cols) blocks.
cudaError_t head_reduce_launch(const void* logits, ElemType type, int64_t rows, int64_t cols, int64_t col0,
                               int64_t slice_cols, const int64_t* targets, bool need_nll, int64_t stride,
                               float* best, int32_t* arg, float* sum, float* tgt, cudaStream_t stream);

// Merges the n_slots partial records of each of M rows: arg_out [M] int64 (lowest index among equal
// maxima); with targets, match_out [M] (arg == target) and, with need_nll, nll_out [M] float32
// (logsumexp - target logit). Any output may be nullptr.
cudaError_t head_merge_launch(const float* best, const int32_t* arg, const float* sum, const float* tgt,
                              int64_t n_slots, int64_t M, const int64_t* targets, bool need_nll,
                              int64_t* arg_out, bool* match_out, float* nll_out, cudaStream_t stream);

}  // namespace memscore
}  // namespace gpu
}  // namespace tinymem
