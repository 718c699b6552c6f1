"""The public fast ops. Each op has a plain-PyTorch reference and dispatches per call to the best
available backend (see :mod:`tinymem_fast.ops.registry`). Nothing here imports the rest of the package."""

from . import attention as _attention
from . import linear_cross_entropy as _linear_cross_entropy
from . import masked_subnet as _masked_subnet
from . import memscore as _memscore
from .attention import causal_attention, causal_attention_available
from .greedy import GreedyOutput, greedy_decode
from .linear_cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
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
from .memscore import ExampleScores, TokenScores, lm_head_argmax, memscore, memscore_examples, reduce_scores
from .registry import BACKENDS, BackendUnavailable

# op name -> module-level functions it covers (for `tinymem info`)
# each family's dispatch spec for registry.select: the backends it has, the compiled ops they call
OP_FAMILIES = {
    "masked_subnet": _masked_subnet.DISPATCH,
    "memscore": _memscore.DISPATCH,
    "causal_attention": _attention.DISPATCH,
    "linear_cross_entropy": _linear_cross_entropy.DISPATCH,
}

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "ExampleScores",
    "FusedLinearCrossEntropyLoss",
    "GreedyOutput",
    "MaskedSubnet",
    "OP_FAMILIES",
    "SubnetSGD",
    "SubnetThreshold",
    "TokenScores",
    "causal_attention",
    "causal_attention_available",
    "fused_linear_cross_entropy",
    "greedy_decode",
    "lm_head_argmax",
    "masked_linear",
    "masked_weight",
    "memscore",
    "memscore_examples",
    "num_dropped",
    "reduce_scores",
    "ste_score_grad",
    "subnet_keep_mask",
    "subnet_sgd_step_",
    "subnet_threshold",
]
