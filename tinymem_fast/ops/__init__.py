"""The public fast ops. Each op has a plain-PyTorch reference and dispatches per call to the best
available backend (see :mod:`tinymem_fast.ops.registry`). Nothing here imports the rest of the package."""

from .masked_subnet import (
    MaskedSubnet,
    SubnetSGD,
    SubnetThreshold,
    masked_linear,
    masked_weight,
    num_dropped,
    ste_score_grad,
    subnet_keep_mask,
    subnet_sgd_step_,
    subnet_threshold,
)
from .registry import BACKENDS, BackendUnavailable

# op name -> module-level functions it covers (for `tinymem info`)
OP_FAMILIES = {
    "masked_subnet": ("subnet_threshold", "masked_weight", "ste_score_grad", "subnet_sgd_step"),
}

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "MaskedSubnet",
    "OP_FAMILIES",
    "SubnetSGD",
    "SubnetThreshold",
    "masked_linear",
    "masked_weight",
    "num_dropped",
    "ste_score_grad",
    "subnet_keep_mask",
    "subnet_sgd_step_",
    "subnet_threshold",
]
