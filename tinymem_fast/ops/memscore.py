"""Fused memorization scoring: greedy-match bits and NLL straight from final hidden states.

For hidden states ``h[B,T,d]``, the LM head ``W[V,d]`` (+ ``bias[V]``) and target ids ``y[B,T]``:

    logits[b,t]  = round_to_input_dtype( fp32(h[b,t] . W[v]) + fp32(bias[v]) )      for every v
    match[b,t]   = argmax_v logits[b,t] == y[b,t]          (ties: lowest index, like torch.argmax)
    nll[b,t]     = logsumexp_v(logits[b,t]) - logits[b,t,y]  (in float32, from the rounded logits)

The dot products accumulate in float32 and the logits are then rounded once to the input dtype, so fp16 /
bf16 results agree with a Hugging Face ``lm_head`` run in that dtype (whose argmax ``generate`` takes).
No backend ever materialises the ``[B,T,V]`` logits: they are produced in tiles of (tokens x vocab chunk)
and reduced on the fly (running max / lowest-index argmax / online logsumexp / target gather), so the
extra memory is O(token_chunk * chunk_size).

Accumulation order differs between backends (MKL, a hand-written CPU kernel, tensor cores), so logits
may differ in the last float32 bit; ``match`` can then differ only where the top two logits are within
that rounding of each other. The cuda backend computes the logits with cuBLAS, block by block (at most
64 MiB of logits at a time), the very GEMM ``F.linear`` runs on that GPU -- so it follows
``torch.backends.cuda.matmul`` (TF32, reduced-precision reductions) like a stock ``lm_head`` -- and
reduces each block with its own kernels (csrc/cuda/head_reduce.cu); ``TINYMEM_CUDA_HEAD=simt`` selects
its older float32 SIMT tiles instead.

``mask`` marks the positions to score; unscored positions get ``match=False`` and ``nll=0`` and their
targets are not looked at (so padding may hold e.g. ``-100``). Non-finite hidden states or weights raise
(see ``validate``); a ``-inf`` bias suppresses ids (their logits never win and add nothing to the NLL).

:func:`memscore_examples` reduces per example (exact-match bit, first-mismatch index, matched count,
mean NLL). With ``need_nll=False`` and ``early_exit=True`` the fast backends prune: each token's target
logit is computed first (one d-length dot product), and a token stops being scored as soon as some logit
provably beats it (strictly greater, or equal at a lower index). The cpp backend computes that dot
product with the very FMA chain its tiles use, so the comparison is exact; the GPU backends, whose
tiled accumulation order is the hardware's, compare against an upper bound that covers any float32
accumulation-order difference. Either way pruning never changes a result: ``exact``, ``first_mismatch``
and ``matched`` (still the full count of matched tokens -- a pruned token is a miss) equal the unpruned
computation exactly. The torch backend and the cuda backend's cuBLAS path ignore ``early_exit`` (a GEMM
block cannot drop single rows; skipping a whole block would need every row of the batch pruned).

The compiled ops are ``torch.ops.tinymem.memscore`` / ``torch.ops.tinymem.lm_head_argmax`` (flat rows;
fake implementations are registered so they trace under ``torch.compile``).

Greedy decoding with a float32 head on a CPU with AVX512-BF16 can go about twice as fast with a
:class:`HeadPack` (:func:`pack_head`, built once per weight): ``lm_head_argmax(..., pack=pack)`` then
screens every logit in bf16 with a rigorous error bound and recomputes only the few that could still be
the maximum with the float32 kernel's own FMA chain, so the ids equal the plain cpp result bit for bit
(``torch.ops.tinymem.lm_head_argmax_screened``; derivation in csrc/cpu/head_screen.cpp).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from . import registry
from .checks import check_bias, check_values, tensor_version

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_CHUNK = 8192  # vocab columns per tile in the torch reference
TOKEN_CHUNK = 1024  # tokens per tile in the torch reference

# op names the registry and `tinymem info` know (OP_FAMILIES["memscore"])
OPS = ("memscore", "memscore_examples", "lm_head_argmax")


@dataclass
class TokenScores:
    """Per-token scores, ``[B,T]``.

    ``match``: bool, argmax of the logits equals the target (False where not scored).
    ``nll``: float32, ``-log softmax(logits)[target]`` (0 where not scored, or everywhere when
    ``has_nll`` is False, i.e. the scores were computed with ``need_nll=False``).
    """

    match: Tensor
    nll: Tensor
    has_nll: bool = True


@dataclass
class ExampleScores:
    """Per-example reductions over the scored positions of each row, ``[B]``.

    ``exact``: bool, every scored token matched. ``first_mismatch``: int64, index of the first miss counted
    within the row's scored positions (``n_scored`` when there is none). ``matched``: int64, number of
    matched scored tokens. ``mean_nll``: float32 mean NLL over the scored tokens (NaN when the NLL was not
    computed or the row has no scored position).
    """

    exact: Tensor
    first_mismatch: Tensor
    matched: Tensor
    mean_nll: Tensor


@dataclass(frozen=True, eq=False)
class HeadPack:
    """A float32 LM head converted once for the bf16-screened argmax (see :func:`pack_head`).

    ``packed``: bfloat16 panels of the weight; ``wnorm``: float32 ``[V]`` row norms (rounded up). ``shape``,
    ``version`` and ``data_ptr`` record the weight at pack time: a pack used with a weight that was since
    modified in place, replaced or reshaped would give wrong ids silently, so such use raises instead
    (writes through ``weight.data`` bypass the version counter and cannot be seen: pack again after them).
    """

    packed: Tensor
    wnorm: Tensor
    shape: tuple[int, int]
    version: int
    data_ptr: int


# --- validation -------------------------------------------------------------------------------


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, hidden_dims: int) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != hidden_dims:
        want = "[B, T, d]" if hidden_dims == 3 else "[N, d]"
        raise ValueError(f"hidden must be {want}, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight (the lm_head) must be [V, d], got shape {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; cast them to one dtype")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has d={hidden.shape[-1]} features but weight {tuple(weight.shape)} "
                         f"expects d={weight.shape[1]}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if hidden.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"empty input: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    check_bias(bias, weight, hidden)


def _check_targets(hidden: Tensor, targets: Tensor, mask: Tensor | None, vocab: int) -> Tensor | None:
    """Validates targets/mask; returns the bool mask (None = every position)."""
    bt = tuple(hidden.shape[:2])
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != bt:
        raise ValueError(f"targets must be [B, T] = {list(bt)}, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids (int64), got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets are on {targets.device} but hidden is on {hidden.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != bt:
            raise ValueError(f"mask must be [B, T] = {list(bt)}, got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = score this position), got {mask.dtype}")
        if mask.device != hidden.device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")
    return mask


def _check_chunk(chunk_size: int | None) -> int:
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


# --- torch reference --------------------------------------------------------------------------


def _logits_tile(h32: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int, dtype) -> Tensor:
    w32 = weight[v0:v1].float()
    if bias is not None:
        lg = torch.addmm(bias[v0:v1].float(), h32, w32.t())
    else:
        lg = h32 @ w32.t()
    if dtype != torch.float32:
        lg = lg.to(dtype).float()  # one rounding of the fp32 accumulator, as a half-precision lm_head does
    return lg


@torch.no_grad()
def scores_torch(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor | None,
                 need_nll: bool, chunk_size: int = 0) -> tuple[Tensor, Tensor | None]:
    """Reference core on flat rows: hidden ``[M,d]``, targets ``[M]`` (or None) ->
    (argmax ``[M]`` int64, nll ``[M]`` float32 or None). Tiled (TOKEN_CHUNK x chunk_size)."""
    m_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or DEFAULT_CHUNK
    dev = hidden.device
    arg = torch.empty(m_rows, dtype=torch.int64, device=dev)
    nll = torch.empty(m_rows, dtype=torch.float32, device=dev) if need_nll else None
    for r0 in range(0, m_rows, TOKEN_CHUNK):
        r1 = min(m_rows, r0 + TOKEN_CHUNK)
        h32 = hidden[r0:r1].float()
        n = r1 - r0
        best = torch.full((n,), float("-inf"), device=dev)
        best_i = torch.zeros(n, dtype=torch.int64, device=dev)
        if need_nll:
            sumexp = torch.zeros(n, device=dev)
            tgt = torch.zeros(n, device=dev)
            y = targets[r0:r1]
        for v0 in range(0, vocab, chunk):
            v1 = min(vocab, v0 + chunk)
            lg = _logits_tile(h32, weight, bias, v0, v1, hidden.dtype)
            ci = torch.argmax(lg, dim=1)  # lowest index among equal maxima
            cmax = lg.gather(1, ci[:, None]).squeeze(1)
            # strictly greater: on equal maxima the earlier chunk (lower index) keeps the argmax
            better = cmax > best if v0 else torch.ones_like(best, dtype=torch.bool)
            best_i = torch.where(better, ci + v0, best_i)
            new_best = torch.where(better, cmax, best)
            if need_nll:
                # while every logit so far is -inf (suppressed ids) the sum stays 0, not exp(-inf - -inf)
                shift = torch.where(new_best == float("-inf"), 0.0, new_best)
                sumexp = sumexp * torch.exp(best - shift) if v0 else sumexp
                sumexp = sumexp + torch.exp(lg - shift[:, None]).sum(1)
                inside = (y >= v0) & (y < v1)
                got = lg.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                tgt = torch.where(inside, got, tgt)
            best = new_best
        arg[r0:r1] = best_i
        if need_nll:
            nll[r0:r1] = best + torch.log(sumexp) - tgt
    return arg, nll


# --- dispatch ---------------------------------------------------------------------------------


def _triton():
    from tinymem_fast.kernels import memscore as tk

    return tk



# --- shapes of the compiled ops, for torch.compile (registered at import) ----------------------------


def _memscore_fake(hidden, weight, bias, targets, need_nll, early_exit, chunk_size):
    m = hidden.shape[0]
    return hidden.new_empty(m, dtype=torch.bool), hidden.new_empty(m, dtype=torch.float32)


def _argmax_fake(hidden, weight, bias, chunk_size):
    return hidden.new_empty(hidden.shape[0], dtype=torch.int64)


def _pack_fake(weight):
    vocab, d = weight.shape
    packed = weight.new_empty(((vocab + 15) // 16, (d + 1) // 2, 32), dtype=torch.bfloat16)
    return packed, weight.new_empty(vocab, dtype=torch.float32)


def _screened_fake(hidden, weight, packed, wnorm, bias):
    return hidden.new_empty(hidden.shape[0], dtype=torch.int64)


registry.register_fakes({"memscore": _memscore_fake, "lm_head_argmax": _argmax_fake,
                         "pack_head_bf16": _pack_fake, "lm_head_argmax_screened": _screened_fake})


# how registry.select dispatches this family: each entry point names the compiled op it calls
DISPATCH = {"backends": registry.BACKENDS, "ext_ops": ("memscore", "lm_head_argmax")}


def _select(op: str, ext_op: str, device: torch.device, backend: str | None) -> str:
    return registry.select(op, device, backend, backends=DISPATCH["backends"], ext_ops=(ext_op,))


def _run(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, need_nll: bool,
         early_exit: bool, chunk: int, b: str) -> tuple[Tensor, Tensor]:
    """Flat rows -> (match bool [M], nll float32 [M]) on backend ``b``."""
    if b == "torch":
        arg, nll = scores_torch(hidden, weight, bias, targets, need_nll, chunk)
        if nll is None:
            nll = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        return arg == targets, nll
    if b == "triton":
        return _triton().memscore(hidden, weight, bias, targets, need_nll, early_exit, chunk)
    return torch.ops.tinymem.memscore(hidden, weight, bias, targets, need_nll, early_exit, chunk)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _token_scores(hidden, weight, targets, bias, mask, need_nll, early_exit, chunk_size, backend, op,
                  validate):
    _check_head(hidden, weight, bias, 3)
    mask = _check_targets(hidden, targets, mask, weight.shape[0])
    chunk = _check_chunk(chunk_size)
    if early_exit and need_nll:
        raise ValueError("early_exit=True needs need_nll=False (pruned tokens have no NLL)")
    if validate:
        check_values(hidden, weight, targets, vocab=weight.shape[0], mask=mask)
    b = _select(op, "memscore", hidden.device, backend)
    bsz, seq, d = hidden.shape
    h = hidden.detach().reshape(bsz * seq, d)
    y = targets.reshape(-1).long()
    w = weight.detach().contiguous()
    bias_c = bias.detach().contiguous() if bias is not None else None
    match = torch.zeros(bsz * seq, dtype=torch.bool, device=hidden.device)
    nll = torch.zeros(bsz * seq, dtype=torch.float32, device=hidden.device)
    if mask is not None and torch.compiler.is_compiling():
        # a graph cannot gather a data-dependent number of rows: score every row, keep the masked ones
        # (unscored targets may hold padding ids, so they are zeroed first)
        flat = mask.reshape(-1)
        y = torch.where(flat, y, 0)
        m, n = _run(h.contiguous(), w, bias_c, y.contiguous(), need_nll, early_exit, chunk, b)
        match, nll = m & flat, torch.where(flat, n, 0.0)
    else:
        idx = None
        if mask is not None and not bool(mask.all()):
            # score only the masked rows: a gather of O(M d) is nothing next to the O(M V d) scoring
            idx = mask.reshape(-1).nonzero().squeeze(1)
            h, y = h[idx], y[idx]
        if h.shape[0]:
            m, n = _run(h.contiguous(), w, bias_c, y.contiguous(), need_nll, early_exit, chunk, b)
            if idx is None:
                match, nll = m, n
            else:
                match[idx], nll[idx] = m, n
    if need_nll and _needs_grad(hidden, weight, bias):
        nll = _differentiable_nll(hidden, weight, targets, bias, mask)
    return TokenScores(match=match.view(bsz, seq), nll=nll.view(bsz, seq), has_nll=need_nll)


def _differentiable_nll(hidden, weight, targets, bias, mask) -> Tensor:
    """The NLL with gradients, from the fused linear cross-entropy (same definition: logits accumulated
    in float32, rounded once to the input dtype, log-softmax in float32); 0 where not scored."""
    from .linear_cross_entropy import fused_linear_cross_entropy

    y = targets.long()
    if mask is not None:
        y = torch.where(mask, y, -100)
    nll = fused_linear_cross_entropy(hidden, weight, y, bias, ignore_index=-100, reduction="none")
    return nll.reshape(-1)


def memscore(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
             mask: Tensor | None = None, need_nll: bool = True, chunk_size: int | None = None,
             backend: str | None = None, validate: bool = True) -> TokenScores:
    """Per-token greedy match and NLL of ``targets`` under ``lm_head(hidden)`` (see the module docstring).

    hidden ``[B,T,d]`` and weight ``[V,d]`` (and bias ``[V]``) share one dtype (float32/float16/bfloat16);
    targets ``[B,T]`` int64 in ``[0, V)`` where scored; mask ``[B,T]`` bool (None = score everything);
    chunk_size: vocab columns per tile (None = backend default).

    ``validate`` (default True): NaN or inf in hidden or weight, and target ids outside the vocabulary,
    raise ValueError -- one host sync per call (the weight is re-read only after it changed). Pass False
    inside a hot loop whose inputs were checked already.

    ``match`` never has gradients. ``nll`` has them when grad mode is on and hidden, weight or bias
    requires grad: it is then computed by :func:`~tinymem_fast.ops.linear_cross_entropy.
    fused_linear_cross_entropy` (the same definition), so memscore can be a loss.
    """
    return _token_scores(hidden, weight, targets, bias, mask, need_nll, False, chunk_size, backend,
                         "memscore", validate)


def reduce_scores(scores: TokenScores, mask: Tensor | None = None) -> ExampleScores:
    """Per-example reductions of token scores over the positions where ``mask`` is True (None = all)."""
    match, nll = scores.match, scores.nll
    if match.dim() != 2 or nll.shape != match.shape:
        raise ValueError(f"scores must hold [B, T] match and nll, got {tuple(match.shape)} and "
                         f"{tuple(nll.shape)}")
    if mask is None:
        mask = torch.ones_like(match)
    elif mask.shape != match.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool [B, T] = {list(match.shape)} tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    n_scored = mask.sum(1)
    hit = match & mask
    miss = mask & ~match
    rank = torch.cumsum(mask, 1) - 1  # index of each position among its row's scored positions
    first = torch.where(miss, rank, n_scored[:, None]).min(1).values
    if scores.has_nll:
        mean_nll = (nll * mask).sum(1) / n_scored  # 0/0 -> NaN for a row with nothing scored
    else:
        mean_nll = torch.full(n_scored.shape, float("nan"), device=match.device)
    return ExampleScores(exact=~miss.any(1), first_mismatch=first, matched=hit.sum(1),
                         mean_nll=mean_nll.float())


def memscore_examples(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                      mask: Tensor | None = None, need_nll: bool = True, early_exit: bool = False,
                      chunk_size: int | None = None, backend: str | None = None,
                      validate: bool = True) -> ExampleScores:
    """:func:`memscore` reduced per example. ``early_exit=True`` (only with ``need_nll=False``) lets the
    fast backends stop scoring a token once it is provably a miss; every field is still exact and
    ``matched`` is still the full count."""
    scores = _token_scores(hidden, weight, targets, bias, mask, need_nll, early_exit, chunk_size, backend,
                           "memscore_examples", validate)
    return reduce_scores(scores, mask)


def head_screen_available() -> bool:
    """The compiled extension has the bf16-screened head and this CPU can run it (AVX512-BF16)."""
    if registry.ext() is None or not all(registry.ext_has(op) for op in ("pack_head_bf16",
                                                                          "lm_head_argmax_screened")):
        return False
    return bool(torch.ops.tinymem.head_screen_available())


def pack_head(weight: Tensor, bias: Tensor | None = None) -> HeadPack | None:
    """Convert a float32 CPU LM head once for ``lm_head_argmax(..., pack=...)``; None where the screened
    head cannot run (not float32 on CPU, no AVX512-BF16, an extension without it, ``TINYMEM_HEAD_SCREEN=0``),
    so callers can always pass the result on.

    The pack depends on ``weight`` only: ``bias`` is accepted for call-site symmetry and passed per call,
    so it may change between calls. Pack again after changing the weight (using a stale pack raises).
    A weight made under ``torch.inference_mode`` has no version counter to detect in-place changes with,
    so it is not packed.
    """
    if os.environ.get("TINYMEM_HEAD_SCREEN") == "0":
        return None
    if not isinstance(weight, Tensor) or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight (the lm_head) must be a non-empty [V, d], got shape {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {getattr(bias, 'shape', bias)!r}")
    version = tensor_version(weight)
    if version is None or not head_screen_available():
        return None
    packed, wnorm = torch.ops.tinymem.pack_head_bf16(weight.detach().contiguous())
    return HeadPack(packed=packed, wnorm=wnorm, shape=tuple(weight.shape), version=version,
                    data_ptr=weight.data_ptr())


def _check_pack(pack: HeadPack, weight: Tensor) -> None:
    if not isinstance(pack, HeadPack):
        raise TypeError(f"pack must be a HeadPack from pack_head() or None, got {type(pack).__name__}")
    if tuple(weight.shape) != pack.shape or weight.data_ptr() != pack.data_ptr:
        raise ValueError(f"stale HeadPack: it was built for another weight (shape {pack.shape}) than this "
                         f"one {tuple(weight.shape)}; call pack_head(weight) again")
    if tensor_version(weight) != pack.version:
        raise ValueError("stale HeadPack: the weight was modified in place after pack_head(weight); "
                         "call pack_head(weight) again")


def lm_head_argmax(hidden: Tensor, weight: Tensor, *, bias: Tensor | None = None,
                   chunk_size: int | None = None, backend: str | None = None,
                   pack: HeadPack | None = None, validate: bool = True) -> Tensor:
    """``argmax_v`` of ``hidden[N,d] @ weight.T + bias`` (logits rounded to the input dtype, lowest index
    on ties) as int64 ``[N]``, tiled over the vocabulary: no ``[N,V]`` logits.

    ``pack`` (from :func:`pack_head`, reused across calls): on the cpp backend with float32 CPU inputs the
    logits are screened in bf16 and only the candidates for the maximum are recomputed in float32 -- the
    same ids as without it, about twice as fast. A pack that no longer matches ``weight`` raises ValueError.
    ``validate``: as in :func:`memscore` (non-finite hidden or weight raise).
    """
    _check_head(hidden, weight, bias, 2)
    chunk = _check_chunk(chunk_size)
    if pack is not None:
        _check_pack(pack, weight)
    if validate:
        check_values(hidden, weight)
    b = _select("lm_head_argmax", "lm_head_argmax", hidden.device, backend)
    h = hidden.detach().contiguous()
    w = weight.detach().contiguous()
    bias_c = bias.detach().contiguous() if bias is not None else None
    if b == "torch":
        return scores_torch(h, w, bias_c, None, False, chunk)[0]
    if b == "triton":
        return _triton().lm_head_argmax(h, w, bias_c, chunk)
    if pack is not None and h.dtype == torch.float32 and h.device.type == "cpu" and registry.ext_has(
            "lm_head_argmax_screened"):
        return torch.ops.tinymem.lm_head_argmax_screened(h, w, pack.packed, pack.wnorm, bias_c)
    return torch.ops.tinymem.lm_head_argmax(h, w, bias_c, chunk)
