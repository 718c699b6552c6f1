"""Batched greedy decoding with a preallocated KV cache and a fused last-position ``lm_head + argmax``.

:func:`greedy_decode` decodes ``k`` tokens for a batch of equal-length prefixes from any Hugging Face
causal LM. The model body runs through the Hugging Face forward (so every architecture works); only the
head is replaced by :func:`~tinymem_fast.ops.memscore.lm_head_argmax`, which never materialises the
``[B, V]`` logits. Rows that already diverged from a reference suffix can be dropped from the batch
(``stop_on_mismatch``), which is all an exact-match test needs.

The KV cache is allocated once at its final length; each step writes its keys/values in place and the
attention reads a view of the filled part. The attention therefore sees exactly the values Hugging Face's
growing ``DynamicCache`` would give it, so the tokens equal ``model.generate(do_sample=False)`` token for
token (same kernels, same shapes), without re-concatenating the whole cache at every step. (Measured on
CPU it is about as fast as the growing cache -- the attention reads a strided view -- and Hugging Face's
full-length ``StaticCache`` was slower there; the attention length still grows, so this is not a
CUDA-graph-capturable cache.)

Also here, because extraction and scoring both need them: :func:`split_causal_lm` (body, head weight/bias,
devices) and :func:`final_hidden` (teacher-forced final hidden states). Nothing here imports the rest of
the package.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .memscore import HeadPack, lm_head_argmax, pack_head

__all__ = ["CausalLMParts", "GreedyOutput", "final_hidden", "greedy_decode", "head_bias",
           "head_pack_for", "make_kv_cache", "rounded_logits", "split_causal_lm", "top2_margin"]


@dataclass
class CausalLMParts:
    """The pieces of a causal LM the fast paths use.

    ``fused`` is True when ``head_weight @ final_hidden + head_bias`` reproduces the model's logits;
    models that transform the logits after the head (logit scaling, soft-capping) get ``fused=False`` and
    the callers fall back to the model's own logits.
    """

    model: torch.nn.Module
    body: torch.nn.Module
    head_weight: torch.Tensor | None
    head_bias: torch.Tensor | None
    cache_kw: str          # name of the cache argument of the body's forward ("cache" or "past_key_values")
    input_device: torch.device
    head_device: torch.device
    vocab_size: int
    max_positions: int | None
    fused: bool = True


# model -> (id of its head module, fused?): a method that swaps the head module gets checked again
_FUSED_OK: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, bool]] = weakref.WeakKeyDictionary()

# config fields of models that transform the logits after the head (scaling, soft-capping)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _max_positions(config) -> int | None:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def split_causal_lm(model: torch.nn.Module, probe: torch.Tensor | None = None) -> CausalLMParts:
    """Body, head and devices of a Hugging Face causal LM.

    The first call per model checks on ``probe`` (a few token ids; a fixed short sequence by default) that
    the head applied to the body's final hidden states gives the model's own logits, and remembers the
    answer.
    """
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate decoder body (base_model); "
                         "expected a Hugging Face *ForCausalLM model")
    weight = getattr(head, "weight", None) if isinstance(head, torch.nn.Linear) else None
    bias = getattr(head, "bias", None) if weight is not None else None
    params = inspect.signature(body.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    emb = model.get_input_embeddings()
    input_device = emb.weight.device
    head_device = weight.device if weight is not None else next(model.parameters()).device
    text_cfg = (model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config")
                else model.config)
    vocab = int(weight.shape[0]) if weight is not None else int(text_cfg.vocab_size)
    parts = CausalLMParts(model, body, weight, bias, cache_kw, input_device, head_device, vocab,
                          _max_positions(model.config))
    transformed = any(getattr(text_cfg, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    if weight is None or transformed:
        parts.fused = False
    elif model in _FUSED_OK and _FUSED_OK[model][0] == id(head):
        parts.fused = _FUSED_OK[model][1]
    else:
        parts.fused = _check_fused(parts, probe)
        _FUSED_OK[model] = (id(head), parts.fused)
    return parts


@torch.no_grad()
def _check_fused(parts: CausalLMParts, probe: torch.Tensor | None) -> bool:
    if probe is None:
        n = min(8, parts.max_positions or 8)
        probe = (torch.arange(n) * 7 + 3) % parts.vocab_size
    probe = probe.reshape(1, -1)[:, :16].to(parts.input_device)
    logits = parts.model(input_ids=probe).logits
    h = final_hidden(parts, probe)
    mine = F.linear(h.to(parts.head_device), parts.head_weight, parts.head_bias)
    ref = logits.to(mine.device, mine.dtype)
    scale = float(ref.abs().max().clamp(min=1.0))
    # loose tolerance: this detects a transformed head (scaling, capping), not rounding differences
    return bool(torch.allclose(mine.float(), ref.float(), rtol=1e-3, atol=1e-3 * scale))


def head_pack_for(parts: CausalLMParts) -> HeadPack | None:
    """The model's head packed for the bf16-screened argmax (same ids, about twice as fast), or None
    where that cannot run (see :func:`~tinymem_fast.ops.memscore.pack_head`)."""
    return pack_head(parts.head_weight) if parts.fused and parts.head_weight is not None else None


def final_hidden(parts: CausalLMParts, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final hidden states ``[B, T, d]`` (after the final norm) of a teacher-forced pass, without the head."""
    out = parts.body(input_ids=ids.to(parts.input_device), use_cache=False, **kwargs)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def head_bias(parts: CausalLMParts, suppress_ids=None) -> torch.Tensor | None:
    """The head bias, with ``-inf`` at ``suppress_ids`` (tokens that may never be chosen, e.g. EOS as the
    reference's ``min_length`` does), or None when there is neither."""
    if not suppress_ids:
        return parts.head_bias
    w = parts.head_weight
    b = (parts.head_bias.detach().clone() if parts.head_bias is not None
         else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    b[torch.as_tensor(list(suppress_ids), dtype=torch.long, device=b.device)] = float("-inf")
    return b


# --- the KV cache -----------------------------------------------------------------------------------

try:  # transformers >= 4.54: caches are lists of layer objects
    from transformers.cache_utils import Cache as _Cache
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # older: fall back to the growing DynamicCache
    _Cache = _DynamicLayer = None

if _DynamicLayer is not None:
    class _PreallocatedLayer(_DynamicLayer):
        """A full-attention cache layer allocated once at ``max_len``; the attention reads ``[:, :, :n]``.

        It behaves like ``DynamicLayer`` (same sequence length, same mask sizes, same key/value tensors
        handed to the attention), so results are bitwise those of ``generate``'s default cache.
        """

        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = max_len
            self.n = 0

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            b, h, _, dk = key_states.shape
            self.kbuf = torch.empty(b, h, self.max_len, dk, dtype=key_states.dtype, device=self.device)
            self.vbuf = torch.empty(b, h, self.max_len, value_states.shape[-1], dtype=value_states.dtype,
                                    device=self.device)
            self.n = 0
            self._views()
            self.is_initialized = True

        def _views(self):
            self.keys = self.kbuf[:, :, : self.n]
            self.values = self.vbuf[:, :, : self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            if self.n + q > self.max_len:
                raise RuntimeError(f"KV cache overflow: {self.n + q} > preallocated {self.max_len} positions")
            self.kbuf[:, :, self.n: self.n + q] = key_states
            self.vbuf[:, :, self.n: self.n + q] = value_states
            self.n += q
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n if self.is_initialized else 0

        def get_max_length(self) -> int:
            return self.max_len

        def reset(self) -> None:
            self.n = 0
            if self.is_initialized:
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            self.n = max(0, self.n + tokens_to_remove)
            if self.is_initialized:
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                indices = indices.to(self.kbuf.device)
                self.kbuf = self.kbuf[indices]
                self.vbuf = self.vbuf[indices]
                self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx.to(self.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.kbuf = self.kbuf.repeat_interleave(repeats, dim=0)
                self.vbuf = self.vbuf.repeat_interleave(repeats, dim=0)
                self._views()


def make_kv_cache(model: torch.nn.Module, max_len: int):
    """A KV cache preallocated for ``max_len`` positions when every layer is plain full attention; for
    other layouts (sliding windows, linear attention) or old transformers, Hugging Face's DynamicCache."""
    from transformers import DynamicCache

    try:
        dyn = DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.54 has no config argument
        return DynamicCache()
    if _Cache is None or not dyn.layers or any(type(layer) is not _DynamicLayer for layer in dyn.layers):
        return dyn
    return _Cache(layers=[_PreallocatedLayer(max_len) for _ in dyn.layers])


# --- greedy decoding ----------------------------------------------------------------------------------


def rounded_logits(parts: CausalLMParts, h: torch.Tensor, bias) -> torch.Tensor:
    """Logits as :mod:`~tinymem_fast.ops.memscore` defines them: fp32 accumulation, one rounding to the
    model dtype."""
    w = parts.head_weight
    lg = h.float() @ w.float().t()
    if bias is not None:
        lg = lg + bias.float()
    return lg.to(w.dtype).float() if w.dtype != torch.float32 else lg


@torch.no_grad()
def top2_margin(parts: CausalLMParts, h: torch.Tensor, keep: torch.Tensor, bias) -> torch.Tensor:
    """Smallest top-1 minus top-2 logit gap per row over the positions in ``keep`` ``[B, T]`` (inf when
    none). Logits are built a few rows at a time to bound memory. For models whose head is not fused,
    ``h`` holds the logits themselves."""
    b, t, _ = h.shape
    out = torch.full((b,), float("inf"), device=h.device)
    rows = max(1, (1 << 24) // max(1, t * parts.vocab_size))
    for r0 in range(0, b, rows):
        lg = rounded_logits(parts, h[r0: r0 + rows], bias) if parts.fused else h[r0: r0 + rows].float()
        top = lg.topk(2, dim=-1).values
        gap = top[..., 0] - top[..., 1]
        gap = torch.where(keep[r0: r0 + rows], gap, torch.full_like(gap, float("inf")))
        out[r0: r0 + rows] = gap.min(1).values
    return out


@dataclass
class GreedyOutput:
    tokens: torch.Tensor          # [B, k] int64; -1 after the step where a row was stopped
    matched: torch.Tensor | None  # [B] int64: positions where the output equals the reference
    first_mismatch: torch.Tensor | None  # [B] int64: first differing position (k when none)
    steps: int                    # decoding steps run (fewer than k when every row stopped)
    accepted: torch.Tensor | None = None  # [B] bool: rows whose reference was accepted as a whole draft
    deferred: torch.Tensor | None = None  # [B] bool: rows left undecoded (``defer_fewer_than``)


def _copy_rows(cache, idx: torch.Tensor):
    """A new cache holding only rows ``idx`` of ``cache`` (the original is left as it is)."""
    import copy

    if _Cache is not None and isinstance(cache, _Cache) and all(
            isinstance(layer, _PreallocatedLayer) for layer in cache.layers):
        layers = []
        for layer in cache.layers:
            new = _PreallocatedLayer(layer.max_len)
            if layer.is_initialized:
                new.device, new.n, new.is_initialized = layer.device, layer.n, True
                new.kbuf, new.vbuf = layer.kbuf[idx], layer.vbuf[idx]
                new._views()
            layers.append(new)
        return _Cache(layers=layers)
    out = copy.deepcopy(cache)
    out.batch_select_indices(idx)
    return out


def _accept_drafts(parts: CausalLMParts, cache, first: torch.Tensor, ref: torch.Tensor, bias,
                   tie_margin: float, backend) -> torch.Tensor:
    """Rows (bool ``[B]``) for which greedy decoding provably reproduces the whole reference suffix.

    Rows whose first decoded token ``first`` already equals ``ref[:, 0]`` feed the rest of their reference
    through the model in one multi-token pass on a copy of the prefix cache (speculative decoding with the
    reference as the draft): while every earlier token matches, the decoder's context is the reference's,
    so the argmax at every draft position equals the decoded token. A multi-token pass rounds differently
    from one-token steps, so a row is accepted only if, at every draft position, the top-1 logit beats the
    top-2 by at least ``tie_margin``. Rows not accepted are decoded as usual.
    """
    from .memscore import memscore_examples

    b, k = ref.shape
    ok = first == ref[:, 0]
    if k == 1 or not bool(ok.any()):
        return ok if k == 1 else torch.zeros(b, dtype=torch.bool, device=ok.device)
    fol = ok.nonzero().reshape(-1)
    dcache = _copy_rows(cache, fol.to(parts.input_device))
    past = cache.get_seq_length()
    draft = ref[fol, : k - 1].to(parts.input_device)
    mask = torch.ones(fol.numel(), past + k - 1, dtype=torch.long, device=parts.input_device)
    out = parts.body(input_ids=draft, attention_mask=mask, use_cache=True, **{parts.cache_kw: dcache})
    h = (out[0] if isinstance(out, tuple) else out.last_hidden_state).to(parts.head_device,
                                                                         parts.head_weight.dtype)
    del dcache
    r = memscore_examples(h, parts.head_weight, ref[fol, 1:], bias=bias, need_nll=False, early_exit=True,
                          backend=backend)
    accepted = torch.zeros(b, dtype=torch.bool, device=ok.device)
    sel = r.exact.nonzero().reshape(-1)
    if sel.numel():
        keep = torch.ones(sel.numel(), k - 1, dtype=torch.bool, device=h.device)
        gap = top2_margin(parts, h[sel], keep, bias)
        accepted[fol[sel[gap >= tie_margin].to(fol.device)]] = True
    return accepted


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prefix: torch.Tensor, k: int, *,
                  reference: torch.Tensor | None = None, stop_on_mismatch: bool = False, suppress_ids=None,
                  draft: bool = False, tie_margin: float = 1e-3, backend: str | None = None,
                  parts: CausalLMParts | None = None, head_pack: HeadPack | None = None,
                  defer_fewer_than: int = 0) -> GreedyOutput:
    """Decode ``k`` tokens greedily after each row of ``prefix`` ``[B, p]`` (no padding, no EOS stop).

    ``reference`` ``[B, k]``: the suffix to compare with; ``matched`` counts equal positions over the whole
    ``k`` (the Pythia-style fractional score is ``matched / k``). ``stop_on_mismatch``: a row leaves the
    batch right after its first differing token (its tokens after that are -1 and ``matched`` then counts
    the tokens before the miss), which is all an exact-match test needs. ``suppress_ids``: token ids that
    may never be chosen (the reference implementation's ``min_length`` suppresses EOS that way).
    ``draft``: try the reference as a draft right after the prefix (see :func:`_accept_drafts`); a row it
    accepts leaves the batch with its reference as its tokens (``accepted`` marks it). Memorized rows then
    cost one multi-token pass instead of ``k`` decoding steps, other rows one extra token of work.
    ``defer_fewer_than``: with ``draft``, when fewer rows than this are left after the drafts, stop there
    and mark them ``deferred`` (tokens -1): a caller decoding many batches pools such leftovers into full
    batches, where one more prefill costs less than ``k`` steps for a handful of rows.
    ``head_pack``: the head converted by :func:`~tinymem_fast.ops.memscore.pack_head` (made here when
    None, where the screened head can run; pass one to share it between calls).
    """
    if prefix.dim() != 2 or prefix.shape[1] < 1:
        raise ValueError(f"prefix must be [B, p] with p >= 1, got shape {tuple(prefix.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, on in (("stop_on_mismatch", stop_on_mismatch), ("draft", draft)):
        if on and reference is None:
            raise ValueError(f"{name} needs a reference suffix")
    if reference is not None and tuple(reference.shape) != (prefix.shape[0], k):
        raise ValueError(f"reference must be [B, k] = [{prefix.shape[0]}, {k}], got {tuple(reference.shape)}")
    parts = parts or split_causal_lm(model)
    b, p = prefix.shape
    dev_in, dev_head = parts.input_device, parts.head_device
    tokens = torch.full((b, k), -1, dtype=torch.long, device=dev_head)
    accepted = torch.zeros(b, dtype=torch.bool, device=dev_head) if draft else None
    deferred = torch.zeros(b, dtype=torch.bool, device=dev_head)
    if b == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev_head)
        return GreedyOutput(tokens, empty if reference is not None else None,
                            empty if reference is not None else None, 0, accepted, deferred)
    ref = reference.to(dev_head) if reference is not None else None
    draft = draft and parts.fused
    bias = head_bias(parts, suppress_ids) if parts.fused else None
    if head_pack is None and parts.fused and backend in (None, "cpp"):
        head_pack = head_pack_for(parts)
    cache = make_kv_cache(model, p + k)
    rows = torch.arange(b, device=dev_head)      # original row of each active batch entry
    inp = prefix.to(dev_in)
    steps = 0
    for i in range(k):
        length = p + i
        mask = torch.ones(rows.shape[0], length, dtype=torch.long, device=dev_in)
        if parts.fused:
            out = parts.body(input_ids=inp, attention_mask=mask, use_cache=True, **{parts.cache_kw: cache})
            h = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, -1]
            # the inputs are checked at the first step; later steps skip the check's host sync
            nxt = lm_head_argmax(h.to(dev_head, parts.head_weight.dtype), parts.head_weight, bias=bias,
                                 backend=backend, pack=head_pack, validate=i == 0)
        else:
            logits = model(input_ids=inp, attention_mask=mask, use_cache=True,
                           **{parts.cache_kw: cache}).logits[:, -1].to(dev_head)
            if suppress_ids:
                logits[:, list(suppress_ids)] = float("-inf")
            nxt = logits.argmax(-1)
        tokens[rows, i] = nxt
        steps = i + 1
        keep = None
        if draft and i == 0:
            acc = _accept_drafts(parts, cache, nxt, ref, bias, tie_margin, backend)
            if bool(acc.any()):
                accepted[acc] = True
                tokens[acc] = ref[acc]
                keep = ~acc
            left = int(rows.shape[0] - acc.sum())
            if 0 < left < defer_fewer_than:
                deferred[~acc] = True
                tokens[~acc] = -1
                break
        if stop_on_mismatch:
            hit = nxt == ref[rows, i]
            keep = hit if keep is None else keep & hit
        if keep is not None and not bool(keep.all()):
            if not bool(keep.any()):
                break
            idx = keep.nonzero().reshape(-1)
            rows = rows[idx]
            nxt = nxt[idx]
            cache.batch_select_indices(idx.to(dev_in))
        inp = nxt[:, None].to(dev_in)
    matched = first = None
    if ref is not None:
        eq = tokens == ref
        matched = eq.sum(1)
        miss = ~eq
        first = torch.where(miss.any(1), miss.float().argmax(1), torch.full_like(matched, k))
    return GreedyOutput(tokens, matched, first, steps, accepted, deferred)
