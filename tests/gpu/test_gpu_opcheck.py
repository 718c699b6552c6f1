"""``torch.library.opcheck`` of the CUDA ops and the Triton ops in half precision.

tests/ops/test_custom_ops.py opchecks every compiled op on CUDA tensors (test_opcheck_cuda_ops) and the
Triton ops on the GPU (test_opcheck_triton_*), in float32, memscore without a bias; here the same ops in
float16 and bfloat16, with mixed weight / score dtypes, a bias, and a maximising SGD step.
"""

import pytest
import torch
from backend_cases import case_id, triton_kernels
from conftest import backend_or_skip

pytestmark = pytest.mark.cuda

HALF = [torch.float16, torch.bfloat16]


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s, w, grad = (torch.randn(7, 13, generator=g).to(dtype).cuda() for _ in range(3))
    h = torch.randn(9, 64, generator=g).to(dtype).cuda()
    hw = (torch.randn(300, 64, generator=g) / 8).to(dtype).cuda()
    bias = torch.randn(300, generator=g).to(dtype).cuda()
    y = torch.randint(0, 300, (9,), generator=g).cuda()
    return s, w, grad, h, hw, bias, y


@pytest.mark.parametrize("dtype", HALF, ids=case_id)
def test_opcheck_cuda_ops_half_precision(dtype):
    backend_or_skip("cuda", "cuda")
    ops = torch.ops.tinymem
    s, w, grad, h, hw, bias, y = _inputs(dtype, 13)
    value, cut = ops.subnet_threshold(s, 30)
    torch.library.opcheck(ops.subnet_threshold, (s, 30))
    torch.library.opcheck(ops.subnet_masked_weight, (w, s, value, cut))
    torch.library.opcheck(ops.subnet_masked_weight, (w.float(), s, value, cut))
    torch.library.opcheck(ops.subnet_ste_grad, (grad, w, s))
    torch.library.opcheck(ops.subnet_ste_grad, (grad.float(), w, s))
    buf = torch.zeros(7, 13, device="cuda")
    torch.library.opcheck(ops.subnet_sgd_step_, (s.clone(), grad, buf, 0.1, 0.9, 5e-4, True))
    for need_nll, early_exit in ((True, False), (False, False), (False, True)):
        torch.library.opcheck(ops.memscore, (h, hw, bias, y, need_nll, early_exit, 0))
    torch.library.opcheck(ops.lm_head_argmax, (h, hw, bias, 0))
    torch.library.opcheck(ops.lm_head_argmax, (h, hw, None, 0))


@pytest.mark.parametrize("dtype", HALF, ids=case_id)
def test_opcheck_triton_ops_half_precision(dtype):
    backend_or_skip("triton", "cuda")
    triton_kernels("memscore", "_memscore_kernel")  # importing the modules registers the ops
    triton_kernels("masked_subnet", "_masked_weight_kernel")
    from tinymem_fast import kernels

    if not kernels.TRITON_OPS:
        pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op")
    ops = torch.ops.tinymem_triton
    s, w, grad, h, hw, bias, y = _inputs(dtype, 14)
    value, cut = ops.subnet_threshold(s, 30)
    torch.library.opcheck(ops.subnet_threshold, (s, 30))
    torch.library.opcheck(ops.subnet_masked_weight, (w, s, value, cut))
    torch.library.opcheck(ops.subnet_ste_grad, (grad, w, s))
    buf = torch.zeros(7, 13, device="cuda")
    torch.library.opcheck(ops.subnet_sgd_step_, (s.clone(), grad, buf, 0.1, 0.9, 5e-4, True))
    torch.library.opcheck(ops.memscore, (h, hw, bias, y, True, False, 0))
    torch.library.opcheck(ops.memscore, (h, hw, bias, y, False, True, 0))
    torch.library.opcheck(ops.lm_head_argmax, (h, hw, bias, 0))
