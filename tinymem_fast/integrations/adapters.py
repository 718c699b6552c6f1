"""MLP adapters: one interface over the MLP blocks of GPT-2, GPTNeoX (Pythia) and Llama-style models.

Every unlearning method reaches MLP weights through :func:`mlp_layers`, so no method names a model class
or hard-codes a shape. The table below is the only place that knows module names:

==========  ==========================  =====================  ==============  ==========================
family      layers                      input side (neuron i)  output side     activation (hooked)
==========  ==========================  =====================  ==============  ==========================
gpt2        transformer.h[l].mlp        c_fc (Conv1D [in,out]) c_proj          act(c_fc(x))
gpt_neox    gpt_neox.layers[l].mlp      dense_h_to_4h (Linear) dense_4h_to_h   act(dense_h_to_4h(x))
llama-like  model.layers[l].mlp         gate_proj and up_proj  down_proj       act(gate(x)) * up(x)
phi3        model.layers[l].mlp         gate_up_proj (stacked) down_proj       act(gate(x)) * up(x)
==========  ==========================  =====================  ==============  ==========================

Phi-3 keeps gate and up in one ``gate_up_proj`` whose output rows are ``[gate; up]`` (``2 * I`` rows), so
its row has ``stacked=2``: neuron ``i`` owns rows ``i`` and ``I + i`` of that matrix. Whole-matrix users
(masked subnet, per-weight methods) need nothing more; a per-neuron edit of the input side must touch
both rows (:meth:`MLPLayer.input_rows`).

Beyond the MLPs, :func:`lm_backbone_and_head` finds the decoder stack and the LM head through Hugging
Face's own API (``base_model``, ``get_output_embeddings``), and :data:`HEAD_TRANSFORMS` lists the config
keys of heads that change the logits after the matmul, which a fused loss on ``h W^T`` cannot reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.masked_subnet import MaskedSubnet, layout_of


@dataclass(frozen=True)
class _Family:
    layers: str          # dotted path from the model to the layer list
    mlp: str             # attribute of a layer holding the MLP
    inputs: tuple        # MLP attributes whose output features are the neurons
    output: str          # MLP attribute whose input features are the neurons
    stacked: int = 1     # row blocks per input matrix: 2 where gate and up share one matrix (Phi-3)


FAMILIES = {
    "gpt2": _Family("transformer.h", "mlp", ("c_fc",), "c_proj"),
    "gpt_neox": _Family("gpt_neox.layers", "mlp", ("dense_h_to_4h",), "dense_4h_to_h"),
    "llama": _Family("model.layers", "mlp", ("gate_proj", "up_proj"), "down_proj"),
}
# Llama-style gated MLPs share the module names; these model types use the same table row.
for _t in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"):
    FAMILIES[_t] = FAMILIES["llama"]
FAMILIES["phi3"] = _Family("model.layers", "mlp", ("gate_up_proj",), "down_proj", stacked=2)


@dataclass
class MLPLayer:
    index: int
    mlp: nn.Module
    inputs: dict[str, nn.Module]    # name -> Linear / Conv1D producing the neurons
    output_name: str
    output: nn.Module               # Linear / Conv1D consuming the neurons
    stacked: int = 1                # see _Family.stacked

    @property
    def intermediate_size(self) -> int:
        m = next(iter(self.inputs.values()))
        rows = m.weight.shape[0] if layout_of(m) == "linear" else m.weight.shape[1]
        return rows // self.stacked

    def input_rows(self, neurons: torch.Tensor) -> torch.Tensor:
        """The output features of each input matrix that belong to ``neurons`` (all ``stacked`` blocks)."""
        size = self.intermediate_size
        return torch.cat([neurons + j * size for j in range(self.stacked)])

    def matrices(self) -> dict[str, nn.Module]:
        return {**self.inputs, self.output_name: self.output}



class UnsupportedArchitecture(TypeError, ValueError):
    """A model family without an MLP adapter here: a wrong argument type to the code, a bad input to a
    command (the CLI reports it in one line)."""

def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def family_of(model) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in FAMILIES:
        return mt
    for name, fam in FAMILIES.items():  # unknown type name but a known structure
        try:
            layers = _get(model, fam.layers)
            mlp = getattr(layers[0], fam.mlp)
            if all(hasattr(mlp, a) for a in (*fam.inputs, fam.output)):
                return name
        except (AttributeError, IndexError, TypeError):
            continue
    raise UnsupportedArchitecture(f"no MLP adapter for {type(model).__name__} (model_type {mt!r}); supported "
                                  "families: GPT-2, GPTNeoX/Pythia, Llama-style gated MLPs")


def mlp_layers(model) -> list[MLPLayer]:
    fam = FAMILIES[family_of(model)]
    out = []
    for i, layer in enumerate(_get(model, fam.layers)):
        mlp = getattr(layer, fam.mlp)
        out.append(MLPLayer(i, mlp, {n: getattr(mlp, n) for n in fam.inputs}, fam.output,
                            getattr(mlp, fam.output), fam.stacked))
    return out


def mlp_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """Every MLP weight and bias, named ``layer.<i>.<module>.<weight|bias>``."""
    params = []
    for layer in mlp_layers(model):
        for name, mod in layer.matrices().items():
            params.append((f"layer.{layer.index}.{name}.weight", mod.weight))
            if getattr(mod, "bias", None) is not None:
                params.append((f"layer.{layer.index}.{name}.bias", mod.bias))
    return params


class SubnetWrapping:
    """Replace every MLP matrix of a model instance with a :class:`MaskedSubnet` (never the class), and
    undo it: :meth:`fold` writes ``W * M`` into the original modules and puts them back."""

    def __init__(self, model, ratio: float, *, score_init: str = "kaiming", seed: int = 0,
                 backend: str | None = None):
        self.model = model
        self.wrapped: list[tuple[nn.Module, str, MaskedSubnet]] = []
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in mlp_layers(model):
            for name, mod in layer.matrices().items():
                masked = MaskedSubnet(mod, ratio, score_init=score_init, generator=gen, backend=backend)
                setattr(layer.mlp, name, masked)
                self.wrapped.append((layer.mlp, name, masked))

    def scores(self) -> list[nn.Parameter]:
        return [m.scores for _, _, m in self.wrapped]

    @torch.no_grad()
    def fold(self):
        for parent, name, masked in self.wrapped:
            setattr(parent, name, masked.fold())
        self.wrapped = []
        return self.model

    def restore(self):
        """Put the original modules back unchanged (an edit that failed leaves the model as it was)."""
        for parent, name, masked in self.wrapped:
            setattr(parent, name, masked.base)
        self.wrapped = []
        return self.model


# Config keys of LM heads that transform the logits after ``h W^T + b`` (key -> what it does). A fused
# loss on the plain matmul would silently train a different model there.
HEAD_TRANSFORMS = {
    "final_logit_softcapping": "tanh soft-capping of the logits (Gemma 2/3)",
    "logit_scale": "multiplies the logits by a scale (Cohere)",
    "logits_scaling": "divides the logits by a scale (Granite)",
    "router_aux_loss_coef": "adds the router's auxiliary loss to the LM loss (mixture of experts)",
}
_NEUTRAL = {"logits_scaling": 1.0}


def head_transform(model) -> str | None:
    """Why the model's LM loss is not ``cross_entropy(h W^T + b)``, or None when it is."""
    config = getattr(model, "config", None)
    for key, what in HEAD_TRANSFORMS.items():
        value = getattr(config, key, None)
        if value is not None and value != _NEUTRAL.get(key):
            return f"its config sets {key}={value!r}: the head {what}"
    return None


def lm_backbone_and_head(model) -> tuple[nn.Module, nn.Linear]:
    """The decoder stack (returns the final hidden states) and the LM head (``nn.Linear``) of a causal LM,
    through Hugging Face's API, so the head's name (``lm_head``, GPTNeoX's older ``embed_out``) never
    matters here."""
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or not isinstance(head, nn.Linear):
        raise UnsupportedArchitecture(f"{type(model).__name__} is not a causal LM with a linear head "
                                      "over a base model (expected e.g. GPT2LMHeadModel, LlamaForCausalLM)")
    return backbone, head
