"""Our fast ops inside a Hugging Face causal LM, one model instance at a time.

* :func:`apply_tinymem` / :func:`unapply_tinymem`: the instance's attention runs through
  :func:`tinymem_attention` (registered with transformers' ``AttentionInterface`` as ``"tinymem"``, so
  ``from_pretrained(..., attn_implementation="tinymem")`` works too once this module is imported), and a
  forward given ``labels`` computes its loss with the fused linear cross-entropy from the final hidden
  states and the LM head, never building the ``[B, T, V]`` logits.
* :func:`apply_masked_subnet` / :func:`fold_masked_subnet`: every MLP matrix becomes a supermask layer
  (:class:`~tinymem_fast.ops.masked_subnet.MaskedSubnet`) with trainable scores, and back.

Nothing here patches a class: other instances of the same model class are untouched. Which modules exist
is known only to :mod:`tinymem_fast.integrations.adapters`. Works with transformers >= 4.48 (the
``AttentionInterface``); padding masks reach the attention only from 4.53 on (``masking_utils``), before
that a model builds its own 4-D mask, which our attention honours through SDPA.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.attention import causal_attention, causal_attention_available
from ..ops.masked_subnet import check_ratio
from .adapters import SubnetWrapping, UnsupportedArchitecture, family_of, head_transform, lm_backbone_and_head

log = logging.getLogger(__name__)

ATTENTION = "tinymem"
MODULE_SETS = ("mlp",)  # what apply_masked_subnet can wrap
_PATCH = "_tinymem_patch"     # instance attribute holding what apply_tinymem changed
_SUBNET = "_tinymem_subnet"   # instance attribute holding the masked-subnet wrapping
_registered = False


# --- attention --------------------------------------------------------------------------------------


def _fused_takes(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """The call is plain causal self-attention, i.e. exactly what SDPA computes with ``is_causal=True``
    (the kernel has no mask, dropout, soft-capping or bias)."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    window = kwargs.get("sliding_window")
    return (attention_mask is None and bool(causal) and not dropout and query.device.type == "cpu"
            and query.shape[2] == key.shape[2] and query.shape[1] % key.shape[1] == 0
            and (window is None or key.shape[2] <= window)
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and kwargs.get("s_aux") is None and not kwargs.get("output_attentions", False))


def tinymem_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Transformers attention function (``[B, H, S, D]`` in, ``([B, S, H, D], None)`` out).

    On the CPU, plain causal self-attention runs our fused kernel (:func:`~tinymem_fast.ops.attention.
    causal_attention`, float32 arithmetic whatever the input dtype); anything else (padding masks,
    dropout, a KV cache, ``TINYMEM_BACKEND=torch``, no compiled kernel) runs transformers' SDPA attention
    in float32. Autocast is off inside either way: on the CPU bf16 attention is slower than float32 and
    less accurate (this is what bf16 training in :mod:`.mixed_precision` relies on). On other devices
    this is transformers' SDPA attention unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # q may arrive as float32 already (rotary embeddings run in float32) and would still be cast down by
    # autocast inside SDPA, so autocast is switched off whichever path is taken.
    with torch.autocast("cpu", enabled=False):
        if (os.environ.get("TINYMEM_BACKEND", "").lower() != "torch" and causal_attention_available()
                and _fused_takes(module, query, key, attention_mask, dropout, kwargs)):
            groups = query.shape[1] // key.shape[1]
            if groups > 1:  # grouped-query attention: the kernel wants one K/V head per query head
                key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
            dtype = query.dtype if query.dtype == key.dtype == value.dtype else torch.float32
            out = causal_attention(query.to(dtype), key.to(dtype), value.to(dtype), scale=scaling)
            return out.transpose(1, 2).to(query.dtype), None
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                              dropout=dropout, scaling=scaling, **kwargs)
    return out.to(query.dtype), weights


def register_attention() -> None:
    """Register :func:`tinymem_attention` as ``"tinymem"`` (idempotent; done when this module loads)."""
    global _registered
    if _registered:
        return
    try:
        # Without a mask function of its own transformers would build no mask at all for this name (it
        # assumes an external backend), silently dropping padding masks; SDPA's is the right one (and
        # it returns None for a purely causal batch, which is when the fused kernel runs).
        register_attention_function(ATTENTION, tinymem_attention)
    except ImportError as exc:
        raise RuntimeError("attention='tinymem' needs transformers >= 4.48 (AttentionInterface); upgrade "
                           "transformers or pass attention=False") from exc
    _registered = True


def register_attention_function(name: str, attention, mask=None) -> None:
    """Register ``attention`` with transformers' ``AttentionInterface`` as ``name``, and its mask builder
    (``mask``; None = SDPA's) where transformers has ``masking_utils`` (>= 4.53; before, models build
    their own masks). ImportError on transformers < 4.48 (no ``AttentionInterface``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask if mask is None else mask)


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise UnsupportedArchitecture(f"{type(model).__name__} cannot switch its attention implementation to "
                                      f"{name!r} (it does not use transformers' AttentionInterface); pass "
                                      "attention=False")


# --- the fused loss ---------------------------------------------------------------------------------


@dataclass
class _Patch:
    attention_was: str | None = None      # the implementation before, when attention was switched
    forward: object = None                # the forward the instance had before (bound), when replaced
    own_forward: object = None            # the instance attribute 'forward' before, if any
    signature: inspect.Signature | None = None


# keyword arguments of a causal LM's forward that belong to the head / loss, not to the base model
_HEAD_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index", "logits_to_keep",
                "return_dict")


def _autocast_on(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def _cross_entropy(hidden, head: nn.Linear, targets, ignore_index: int, num_items_in_batch):
    from ..ops.linear_cross_entropy import fused_linear_cross_entropy

    targets = targets.to(hidden.device)
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if _autocast_on(device):
        # what autocast does to the head's F.linear: both sides in the low-precision dtype, so the logits
        # are rounded as the unpatched model's are (and the weight gradient flows back through the cast)
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                      bias, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _output(backbone_out, loss):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # transformers 5.x renamed past_key_values to cache
    cache_key = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    cache = backbone_out.get(cache_key)  # (asking 5.x for past_key_values logs a deprecation)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=backbone_out.get("hidden_states"),
                                  attentions=backbone_out.get("attentions"), **{cache_key: cache})


def _fused_loss_forward(self, *args, **kwargs):
    """Replacement forward bound to one instance by :func:`apply_tinymem`: with ``labels`` (or
    ``shift_labels``), the base model runs, then the loss is the fused linear cross-entropy of the final
    hidden states; ``logits`` in the output is None. Everything else is the original forward."""
    patch: _Patch = self.__dict__[_PATCH]
    try:
        bound = patch.signature.bind_partial(*args, **kwargs)
    except TypeError:
        return patch.forward(*args, **kwargs)  # let the original forward report the bad call
    named = dict(bound.arguments)
    for p in patch.signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and named.get(p.name):
            return patch.forward(*args, **kwargs)
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            named.pop(p.name, None)
    labels, shift_labels = named.get("labels"), named.get("shift_labels")
    keep = named.get("logits_to_keep", 0)
    if (labels is None and shift_labels is None) or not (isinstance(keep, int) and keep == 0):
        return patch.forward(*args, **kwargs)
    head_kw = {k: named.pop(k, None) for k in _HEAD_KWARGS}
    backbone, head = lm_backbone_and_head(self)
    out = backbone(**named, return_dict=True)
    hidden = out[0]
    ignore_index = -100 if head_kw["ignore_index"] is None else head_kw["ignore_index"]
    if shift_labels is None:  # position t predicts token t + 1; the last position predicts nothing
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    loss = _cross_entropy(hidden, head, targets, ignore_index, head_kw["num_items_in_batch"])
    result = _output(out, loss)
    return result.to_tuple() if head_kw["return_dict"] is False else result


# --- apply / unapply --------------------------------------------------------------------------------


def apply_tinymem(model, attention: bool = True, cross_entropy: bool = True):
    """Patch this model instance (not its class) to use tinymem_fast's fused ops; returns the model.

    ``attention``: the instance's attention implementation becomes ``"tinymem"``
    (:func:`tinymem_attention`: our fused causal kernel on the CPU, SDPA otherwise). It is stored in the
    model's config object, so models built on one shared config object share it.

    ``cross_entropy``: a forward call given ``labels`` computes the causal LM loss (shift by one,
    ``ignore_index=-100``, divided by ``num_items_in_batch`` when given, as Hugging Face does) with the
    fused linear cross-entropy from the final hidden states and the LM head weight, never materialising
    the ``[B, T, V]`` logits: **the output's ``logits`` is then None**. Without labels (or with
    ``logits_to_keep`` set) the forward is the original one. Refused for heads that transform the logits
    after the matmul (Gemma 2's soft-capping, Cohere's / Granite's logit scales, MoE auxiliary losses).

    The model family must be one the adapters know (GPT-2, GPTNeoX, Llama, Qwen2, Mistral, Phi-3, Gemma,
    ...). Undo with :func:`unapply_tinymem`.
    """
    if getattr(model, _PATCH, None) is not None:
        raise ValueError("apply_tinymem: this model is already patched; call unapply_tinymem(model) first")
    if not (attention or cross_entropy):
        raise ValueError("apply_tinymem: nothing to do (attention=False and cross_entropy=False)")
    family_of(model)  # an unknown layout is refused before anything changes
    patch = _Patch()
    if cross_entropy:
        lm_backbone_and_head(model)
        why = head_transform(model)
        if why is not None:
            raise UnsupportedArchitecture(f"apply_tinymem: the fused cross-entropy cannot stand in for "
                                          f"{type(model).__name__}'s loss: {why}; pass cross_entropy=False")
        try:
            from ..ops import linear_cross_entropy  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("apply_tinymem: tinymem_fast.ops.linear_cross_entropy is not available in "
                               "this install; pass cross_entropy=False") from exc
    if attention:
        register_attention()
        patch.attention_was = model.config._attn_implementation
        _set_attention(model, ATTENTION)
    if cross_entropy:
        patch.own_forward = model.__dict__.get("forward")
        patch.forward = model.forward
        patch.signature = inspect.signature(model.forward)
        model.forward = types.MethodType(_fused_loss_forward, model)
    setattr(model, _PATCH, patch)
    return model


def unapply_tinymem(model):
    """Undo :func:`apply_tinymem` on this instance; returns the model."""
    patch: _Patch | None = getattr(model, _PATCH, None)
    if patch is None:
        raise ValueError("unapply_tinymem: this model was not patched by apply_tinymem")
    if patch.attention_was is not None:
        _set_attention(model, patch.attention_was)
    if patch.forward is not None:
        if patch.own_forward is None:
            del model.forward
        else:
            model.forward = patch.own_forward
    delattr(model, _PATCH)
    return model


def is_patched(model) -> bool:
    return getattr(model, _PATCH, None) is not None


# --- masked subnet ----------------------------------------------------------------------------------


@dataclass
class _Subnet:
    wrapping: SubnetWrapping
    requires_grad: dict       # parameter name -> requires_grad before wrapping (restored by the fold)


def apply_masked_subnet(model, ratio: float, modules: str = "mlp", *, score_init: str = "kaiming",
                        seed: int = 0, backend: str | None = None) -> list[nn.Parameter]:
    """Turn every MLP matrix of this instance into a masked-subnet layer that drops the ``ratio`` fraction
    of its weights with the lowest ``|score|``; returns the trainable score parameters (also
    :func:`masked_subnet_scores`). All other parameters are frozen until :func:`fold_masked_subnet`.

    ``modules``: which matrices; only ``"mlp"`` (all MLP input and output matrices) today.
    ``score_init``: ``"kaiming"`` (uniform, seeded by ``seed``) or ``"magnitude"`` (``|W|``).
    """
    if modules not in MODULE_SETS:
        raise ValueError(f"apply_masked_subnet: unknown modules {modules!r}; choose one of "
                         f"{', '.join(map(repr, MODULE_SETS))}")
    if getattr(model, _SUBNET, None) is not None:
        raise ValueError("apply_masked_subnet: this model is already wrapped; call fold_masked_subnet(model) "
                         "first")
    check_ratio(ratio)
    if score_init not in ("kaiming", "magnitude"):
        raise ValueError(f"apply_masked_subnet: score_init must be 'kaiming' or 'magnitude', got "
                         f"{score_init!r}")
    family_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapping = SubnetWrapping(model, ratio, score_init=score_init, seed=seed, backend=backend)
    setattr(model, _SUBNET, _Subnet(wrapping, flags))
    return wrapping.scores()


def masked_subnet_scores(model) -> list[nn.Parameter]:
    """The score parameters of a model wrapped by :func:`apply_masked_subnet` (what the optimizer trains)."""
    return _subnet(model, "masked_subnet_scores").wrapping.scores()


def fold_masked_subnet(model):
    """Write ``W * mask`` into the original MLP modules, put them back and restore every parameter's
    ``requires_grad``: a plain model of the original class again, returned."""
    state = _subnet(model, "fold_masked_subnet")
    state.wrapping.fold()
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    delattr(model, _SUBNET)
    return model


def _subnet(model, who: str) -> _Subnet:
    state = getattr(model, _SUBNET, None)
    if state is None:
        raise ValueError(f"{who}: this model has no masked subnet; call apply_masked_subnet(model, ratio) "
                         "first")
    return state


try:  # so that attn_implementation="tinymem" works in from_pretrained / from_config after the import
    register_attention()
except RuntimeError:  # transformers < 4.48: the fused loss and masked subnet still work
    pass
