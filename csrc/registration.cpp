// Op schemas (namespace `tinymem`), CPU implementations and the Python module with build metadata.
// CUDA implementations register themselves in csrc/cuda/*_cuda.cpp when built with CUDA.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/causal_attention.h"
#include "cpu/cpu_isa.h"
#include "cpu/head_screen.h"
#include "cpu/linear_cross_entropy.h"
#include "cpu/masked_subnet.h"
#include "cpu/memscore.h"

TORCH_LIBRARY(tinymem, m) {
  // Masked subnet (see tinymem_fast/ops/masked_subnet.py for the semantics).
  // value: 0-dim float32, cut: 0-dim int64; entry i dropped iff |s_i| < value or (|s_i| == value and i < cut)
  m.def("subnet_threshold(Tensor scores, int k) -> (Tensor value, Tensor cut)");
  m.def("subnet_masked_weight(Tensor weight, Tensor scores, Tensor value, Tensor cut) -> Tensor");
  m.def("subnet_ste_grad(Tensor grad, Tensor weight, Tensor scores) -> Tensor");
  m.def("subnet_sgd_step_(Tensor(a!) scores, Tensor grad, Tensor(b!) momentum_buffer, float lr, "
        "float momentum, float weight_decay, bool maximize) -> ()");
  // Memorization scoring (tinymem_fast/ops/memscore.py): hidden [M, d], weight [V, d], bias [V]?, targets [M]
  // int64 -> match bool [M], nll float32 [M] (zeros unless need_nll); chunk_size 0 = the backend's default.
  m.def("memscore(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, bool need_nll, bool early_exit, "
        "int chunk_size) -> (Tensor match, Tensor nll)");
  m.def("lm_head_argmax(Tensor hidden, Tensor weight, Tensor? bias, int chunk_size) -> Tensor");
  // Greedy-decoding head screened in bf16 (csrc/cpu/head_screen.cpp; float32 only, AVX512-BF16 CPUs): the
  // packed weight and row norms come from pack_head_bf16 once per weight; the result equals lm_head_argmax.
  // head_screen_stats: [calls, rows screened, exact candidates, fallback rows], reset reads and zeroes them.
  m.def("head_screen_available() -> bool", &tinymem::cpu::head_screen_available);
  m.def("head_screen_stats(bool reset=False) -> int[]", &tinymem::cpu::head_screen_stats);
  m.def("pack_head_bf16(Tensor weight) -> (Tensor packed, Tensor wnorm)");
  m.def("lm_head_argmax_screened(Tensor hidden, Tensor weight, Tensor packed, Tensor wnorm, Tensor? bias) "
        "-> Tensor");
  // Fused causal self-attention for CPU training (csrc/cpu/causal_attention.cpp, ops/attention.py):
  // q, k, v [B, H, S, D] float32 or bfloat16 (one dtype, any strides); out in q's dtype, lse float32
  // [B, H, S] (natural-log row logsumexp of scale * q k^T over keys <= s), the backward's input.
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def("causal_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Fused linear + cross-entropy (csrc/cpu/linear_cross_entropy.cpp, ops/linear_cross_entropy.py): hidden [N, d],
  // weight [V, d], bias [V]?, targets [N] int64; reduction 0 none / 1 mean / 2 sum. fwd -> loss float32 ([N] or
  // 0-dim), lse float32 [N], and for mean/sum the gradients of a unit upstream gradient as need_* asks (a
  // half-precision weight's comes from bwd; grad_bias float32); bwd: the gradients for `grad`.
  m.def("linear_ce_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
        "float label_smoothing, int reduction, bool need_hidden, bool need_weight, bool need_bias, int chunk_rows) "
        "-> (Tensor loss, Tensor lse, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def("linear_ce_bwd(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
        "int ignore_index, float label_smoothing, int reduction, bool need_hidden, bool need_weight, "
        "bool need_bias, int chunk_rows) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(tinymem, CPU, m) {
  m.impl("subnet_threshold", &tinymem::cpu::subnet_threshold);
  m.impl("subnet_masked_weight", &tinymem::cpu::subnet_masked_weight);
  m.impl("subnet_ste_grad", &tinymem::cpu::subnet_ste_grad);
  m.impl("subnet_sgd_step_", &tinymem::cpu::subnet_sgd_step_);
  m.impl("memscore", &tinymem::cpu::memscore);
  m.impl("lm_head_argmax", &tinymem::cpu::lm_head_argmax);
  m.impl("pack_head_bf16", &tinymem::cpu::pack_head_bf16);
  m.impl("lm_head_argmax_screened", &tinymem::cpu::lm_head_argmax_screened);
  m.impl("causal_attention_fwd", &tinymem::cpu::causal_attention_fwd);
  m.impl("causal_attention_bwd", &tinymem::cpu::causal_attention_bwd);
  m.impl("linear_ce_fwd", &tinymem::cpu::linear_ce_fwd);
  m.impl("linear_ce_bwd", &tinymem::cpu::linear_ce_bwd);
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["torch"] = TINYMEM_BUILD_TORCH;
  d["cuda"] = TINYMEM_BUILD_CUDA;
  d["python"] = TINYMEM_BUILD_PYTHON;
#ifdef TINYMEM_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}
}  // namespace

pybind11::dict cpu_isa_info() {
  namespace isa = tinymem::cpu::cpu_isa;
  pybind11::dict d;
  d["best"] = isa::name(isa::best());
  const int want = isa::requested();
  d["requested"] = want < 0 ? pybind11::object(pybind11::none())
                            : pybind11::object(pybind11::str(isa::name(want)));
  d["chosen"] = isa::name(isa::chosen());
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tinymem_fast compiled kernels (ops are registered under torch.ops.tinymem)";
  m.def("build_info", &build_info, "torch/CUDA/Python versions this extension was built for");
  m.def("cpu_isa", &cpu_isa_info,
        "the CPU kernels' instruction-set level: this CPU's best, TINYMEM_CPU_ISA's request, the one in force");
}
