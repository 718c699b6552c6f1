// CUDA implementations of the memscore ops (schemas: csrc/registration.cpp; semantics:
// tinymem_fast/ops/memscore.py). Tensor checks, allocation, the early-exit target bound, the vocabulary
// split and the merge of its partial results live here; the kernels (memscore.cu, head_reduce.cu) see raw
// pointers only. Nothing here synchronises with the host.
//
// Two paths. The default ("gemm") computes the logits of (rows x vocabulary chunk) blocks with cuBLAS --
// tensor cores, the very GEMM F.linear runs, so it follows torch.backends.cuda.matmul's TF32 and
// reduced-precision settings as a stock lm_head does -- into one buffer of at most kBufferBytes, and
// reduces each block with head_reduce.cu; a decoding step (a few rows) is one bandwidth-bound GEMV plus
// two small kernels. It ignores early_exit: a block's GEMM cannot skip single rows, and skipping a whole
// chunk needs every row of the batch pruned (rare once a few hundred tokens are scored); match is exact
// either way. TINYMEM_CUDA_HEAD=simt selects the SIMT tiles of memscore.cu (float32 FMAs in index
// order, early exit), kept for comparison and for GPUs where cuBLAS is unavailable.
#ifdef TINYMEM_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "memscore_kernels.h"

namespace tinymem {
namespace cuda_impl {
namespace {

namespace ms = gpu::memscore;

ms::ElemType elem_type(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return ms::ElemType::kFloat32;
    case at::kHalf: return ms::ElemType::kFloat16;
    case at::kBFloat16: return ms::ElemType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "tinymem::", op, ": hidden must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  return ms::ElemType::kFloat32;  // not reached
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tinymem::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "tinymem::", op, ": ", name, " is on ", t.device(),
              " but hidden is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "tinymem::", op, ": ", name, " must be contiguous");
}

struct Head {
  at::Tensor hidden, weight, bias;  // bias undefined when absent
  ms::ElemType type;
  int64_t M, V, D;
};

Head check_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const char* op) {
  check_cuda(hidden, hidden, op, "hidden");
  check_cuda(weight, hidden, op, "weight");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "tinymem::", op,
              ": need hidden [M, d] and weight [V, d], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "tinymem::", op, ": weight is ",
              weight.scalar_type(), " but hidden is ", hidden.scalar_type());
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "tinymem::", op, ": weight is empty: ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) < (int64_t{1} << 31), "tinymem::", op, ": vocabularies of 2^31 or more rows "
              "are not supported");
  Head h{hidden, weight, at::Tensor(), elem_type(hidden, op), hidden.size(0), weight.size(0),
         weight.size(1)};
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, hidden, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h.V && bias->scalar_type() == hidden.scalar_type(),
                "tinymem::", op, ": bias must be ", hidden.scalar_type(), " [", h.V, "], got ",
                bias->scalar_type(), " ", bias->sizes());
    h.bias = *bias;
  }
  return h;
}

// An upper bound of the tiled, rounded target logit (see kernels/memscore.py: target_upper_bound).
at::Tensor target_upper_bound(const Head& h, const at::Tensor& targets) {
  const at::Tensor hf = h.hidden.to(at::kFloat);
  const at::Tensor wy = h.weight.index_select(0, targets).to(at::kFloat);
  const at::Tensor dot = (hf * wy).sum(-1);
  const at::Tensor absdot = (hf.abs() * wy.abs()).sum(-1);
  at::Tensor val = dot, babs = at::zeros_like(dot);
  if (h.bias.defined()) {
    const at::Tensor by = h.bias.index_select(0, targets).to(at::kFloat);
    val = dot + by;
    babs = by.abs();
  }
  const double eps24 = 1.0 / 16777216.0, eps20 = 1.0 / 1048576.0;
  const at::Tensor margin =
      absdot * (4.0 * static_cast<double>(h.D) * eps24) + (dot.abs() + babs) * eps20 + 1e-30;
  return (val + margin).to(h.hidden.scalar_type()).to(at::kFloat);
}

struct Partials {
  at::Tensor best, arg, sum, tgt, dead;
};

Partials run(const Head& h, const int64_t* targets, const at::Tensor& thi, bool need_nll, bool early_exit,
             const char* op) {
  const auto opts = h.hidden.options();
  const int64_t row_blocks = (h.M + ms::kTileM - 1) / ms::kTileM;
  const int64_t tiles = (h.V + ms::kTileN - 1) / ms::kTileN;
  // enough blocks for two waves over the SMs: few token blocks (greedy decoding) split the vocabulary
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t split =
      std::max<int64_t>(1, std::min<int64_t>({tiles, (2 * sms + row_blocks - 1) / row_blocks, 65535}));
  const int64_t v_per_split = ((tiles + split - 1) / split) * ms::kTileN;
  split = (h.V + v_per_split - 1) / v_per_split;
  Partials p;
  p.best = at::empty({split, h.M}, opts.dtype(at::kFloat));
  p.arg = at::empty({split, h.M}, opts.dtype(at::kInt));
  if (need_nll) {
    p.sum = at::empty({split, h.M}, opts.dtype(at::kFloat));
    p.tgt = at::empty({split, h.M}, opts.dtype(at::kFloat));
  }
  if (early_exit) p.dead = at::empty({split, h.M}, opts.dtype(at::kChar));
  const cudaError_t err = ms::memscore_launch(
      h.hidden.data_ptr(), h.weight.data_ptr(), h.bias.defined() ? h.bias.data_ptr() : nullptr, h.type,
      targets,
      early_exit ? thi.data_ptr<float>() : nullptr, h.M, h.V, h.D, v_per_split, split, need_nll, early_exit,
      p.best.data_ptr<float>(), p.arg.data_ptr<int32_t>(), need_nll ? p.sum.data_ptr<float>() : nullptr,
      need_nll ? p.tgt.data_ptr<float>() : nullptr, early_exit ? p.dead.data_ptr<int8_t>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "tinymem::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return p;
}

// lowest index among the slices' equal maxima
at::Tensor merged_argmax(const Partials& p, const at::Tensor& top, int64_t V) {
  const at::Tensor none = at::scalar_tensor(V, p.arg.options().dtype(at::kLong));
  return at::where(p.best == top, p.arg.to(at::kLong), none)
      .amin(0)
      .clamp_max(V - 1);
}

// --- the cuBLAS path ---------------------------------------------------------------------------

// the logits buffer: 64 MiB is 16% of a 4,096 x 50,304 bf16 head's logits and keeps each GEMM large
// enough (thousands of columns) to run near the tensor cores' peak
constexpr int64_t kBufferBytes = int64_t{64} << 20;
constexpr int64_t kMaxRowBlock = 8192;
constexpr int64_t kMinSlice = 1024;

bool use_simt() {
  const char* v = std::getenv("TINYMEM_CUDA_HEAD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "gemm") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "simt") == 0, "TINYMEM_CUDA_HEAD must be 'gemm' or 'simt', got '", v, "'");
  return true;
}

struct GemmPlan {
  int64_t row_block, chunk, slice, n_slots;
};

// Rows per GEMM, vocabulary columns per GEMM (`chunk_size` when given), and the reduction's slice: small
// enough that rows x slices fill the GPU when there are few rows, a divisor of the chunk so every slice
// of every chunk is one slot.
GemmPlan plan_gemm(const Head& h, int64_t chunk_size) {
  GemmPlan p{};
  p.row_block = std::min(h.M, kMaxRowBlock);
  const int64_t elem = h.hidden.element_size();
  int64_t chunk = chunk_size > 0 ? chunk_size : kBufferBytes / (p.row_block * elem);
  chunk = std::min(std::max<int64_t>(chunk, 256), h.V);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_row = std::max<int64_t>(1, (4 * sms + p.row_block - 1) / p.row_block);
  int64_t slice = (chunk + per_row - 1) / per_row;
  slice = std::max(kMinSlice, (slice + 255) / 256 * 256);  // whole 16-byte vectors per thread
  // the reduction grid's y dimension is the slices of one chunk
  slice = std::max(slice, (chunk + 65534) / 65535);
  if (slice >= chunk) {
    slice = chunk;
  } else if (chunk < h.V) {
    chunk = chunk / slice * slice;  // a block boundary is a slice boundary
  }  // else one block holds the whole vocabulary (decoding) and only its last slice is partial
  p.chunk = chunk;
  p.slice = slice;
  p.n_slots = (h.V + slice - 1) / slice;  // slot s: columns [s * slice, (s + 1) * slice)
  return p;
}

struct GemmOut {
  at::Tensor arg, match, nll;
};

GemmOut gemm_head(const Head& h, const at::Tensor& targets, bool need_nll, int64_t chunk_size, const char* op) {
  const GemmPlan pl = plan_gemm(h, chunk_size);
  const auto f32 = h.hidden.options().dtype(at::kFloat);
  const at::Tensor best = at::empty({pl.n_slots, h.M}, f32);
  const at::Tensor arg = at::empty({pl.n_slots, h.M}, f32.dtype(at::kInt));
  at::Tensor sum, tgt;
  if (need_nll) {
    sum = at::empty({pl.n_slots, h.M}, f32);
    tgt = at::empty({pl.n_slots, h.M}, f32);
  }
  const at::Tensor buf = at::empty({pl.row_block * std::min(pl.chunk, h.V)}, h.hidden.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t* y = targets.defined() ? targets.data_ptr<int64_t>() : nullptr;
  for (int64_t r0 = 0; r0 < h.M; r0 += pl.row_block) {
    const int64_t rows = std::min(pl.row_block, h.M - r0);
    const at::Tensor hrows = h.hidden.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < h.V; c0 += pl.chunk) {
      const int64_t cols = std::min(pl.chunk, h.V - c0);
      at::Tensor out = buf.narrow(0, 0, rows * cols).view({rows, cols});
      const at::Tensor wt = h.weight.narrow(0, c0, cols).t();
      if (h.bias.defined()) {
        at::addmm_out(out, h.bias.narrow(0, c0, cols), hrows, wt);
      } else {
        at::mm_out(out, hrows, wt);
      }
      const int64_t o = (c0 / pl.slice) * h.M + r0;
      const cudaError_t err = ms::head_reduce_launch(
          out.data_ptr(), h.type, rows, cols, c0, pl.slice, y == nullptr ? nullptr : y + r0, need_nll, h.M,
          best.data_ptr<float>() + o, arg.data_ptr<int32_t>() + o, need_nll ? sum.data_ptr<float>() + o : nullptr,
          need_nll ? tgt.data_ptr<float>() + o : nullptr, stream);
      TORCH_CHECK(err == cudaSuccess, "tinymem::", op, ": CUDA reduction launch failed: ",
                  cudaGetErrorString(err));
    }
  }
  GemmOut res;
  res.arg = at::empty({h.M}, f32.dtype(at::kLong));
  if (y != nullptr) res.match = at::empty({h.M}, f32.dtype(at::kBool));
  if (need_nll) res.nll = at::empty({h.M}, f32);
  const cudaError_t err = ms::head_merge_launch(
      best.data_ptr<float>(), arg.data_ptr<int32_t>(), need_nll ? sum.data_ptr<float>() : nullptr,
      need_nll ? tgt.data_ptr<float>() : nullptr, pl.n_slots, h.M, y, need_nll, res.arg.data_ptr<int64_t>(),
      y == nullptr ? nullptr : res.match.data_ptr<bool>(), need_nll ? res.nll.data_ptr<float>() : nullptr,
      stream);
  TORCH_CHECK(err == cudaSuccess, "tinymem::", op, ": CUDA merge launch failed: ", cudaGetErrorString(err));
  return res;
}

std::tuple<at::Tensor, at::Tensor> memscore(const at::Tensor& hidden, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                            bool need_nll, bool early_exit, int64_t chunk_size) {
  constexpr const char* op = "memscore";
  const Head h = check_head(hidden, weight, bias, op);
  check_cuda(targets, hidden, op, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == h.M, "tinymem::",
              op, ": targets must be int64 [", h.M, "], got ", targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(!(early_exit && need_nll), "tinymem::", op, ": early_exit needs need_nll=false");
  TORCH_CHECK(chunk_size >= 0, "tinymem::", op, ": chunk_size must be >= 0, got ", chunk_size);
  c10::cuda::CUDAGuard guard(hidden.device());
  if (h.M == 0)
    return {at::zeros({0}, hidden.options().dtype(at::kBool)),
            at::zeros({0}, hidden.options().dtype(at::kFloat))};
  if (!use_simt()) {
    GemmOut g = gemm_head(h, targets, need_nll, chunk_size, op);
    if (!need_nll) g.nll = at::zeros({h.M}, hidden.options().dtype(at::kFloat));
    return {g.match, g.nll};
  }
  // the SIMT tiles are fixed (kTileN columns): chunk_size is a tiling hint for the other paths
  // targets are only compared with column indices in the kernel, never used to address memory, and
  // index_select (early-exit bound) checks its indices on the device: no host-side range check needed
  const at::Tensor thi = early_exit ? target_upper_bound(h, targets) : at::Tensor();
  const Partials p = run(h, targets.data_ptr<int64_t>(), thi, need_nll, early_exit, op);
  const at::Tensor top = std::get<0>(p.best.max(0));
  at::Tensor match = merged_argmax(p, top, h.V) == targets;
  if (early_exit) match = match & p.dead.sum(0).eq(0);
  at::Tensor nll;
  if (need_nll) {
    nll = top + at::log((p.sum * at::exp(p.best - top)).sum(0)) - p.tgt.sum(0);
  } else {
    nll = at::zeros({h.M}, hidden.options().dtype(at::kFloat));
  }
  return {match, nll};
}

at::Tensor lm_head_argmax(const at::Tensor& hidden, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t chunk_size) {
  constexpr const char* op = "lm_head_argmax";
  const Head h = check_head(hidden, weight, bias, op);
  TORCH_CHECK(chunk_size >= 0, "tinymem::", op, ": chunk_size must be >= 0, got ", chunk_size);
  c10::cuda::CUDAGuard guard(hidden.device());
  if (h.M == 0) return at::zeros({0}, hidden.options().dtype(at::kLong));
  if (!use_simt()) return gemm_head(h, at::Tensor(), false, chunk_size, op).arg;
  const Partials p = run(h, nullptr, at::Tensor(), false, false, op);
  return merged_argmax(p, std::get<0>(p.best.max(0)), h.V);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace tinymem

TORCH_LIBRARY_IMPL(tinymem, CUDA, m) {
  m.impl("memscore", &tinymem::cuda_impl::memscore);
  m.impl("lm_head_argmax", &tinymem::cuda_impl::lm_head_argmax);
}

#endif  // TINYMEM_WITH_CUDA
