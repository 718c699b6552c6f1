"""Per-example memorization scoring and greedy extraction for any Hugging Face causal LM.

* :func:`score_exact` -- is the suffix ``ids[p:p+k]`` what greedy decoding from ``ids[:p]`` produces?
  Answered for a whole batch by one teacher-forced pass (SPEC 4.5): greedy decoding reproduces the suffix
  iff the argmax at every suffix position of the teacher-forced pass is the next suffix token, because
  while every earlier token matches, the decoder's context is the teacher-forced one. The model body
  runs once over ``p + k - 1`` tokens and :func:`~tinymem_fast.ops.memscore.memscore_examples` scores
  the ``k`` suffix positions straight from the hidden states (no logits on prefix positions, never the
  ``[B, T, V]`` logits). ``verify`` re-decodes near-tie rows (or all rows) to guard against the different
  rounding of a full-sequence and a KV-cache pass.
* :func:`extract` -- real batched greedy decoding (:func:`~tinymem_fast.ops.greedy.greedy_decode`) with a
  preallocated KV cache: the generated tokens and the Pythia-style fractional score (matched / k).
* :func:`load_sequences` / :func:`load_causal_lm` / :func:`run_command`: input files, model folders and
  the ``tinymem score`` / ``tinymem extract`` commands (single process or ``torchrun``).

No padding is ever needed: every row is cut to ``p + k`` tokens and attention is causal, so results do
not depend on batch size or on what follows the suffix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..common import atomic
from ..common.devices import device_name
from ..integrations.loading import DTYPES, has_tokenizer, load_causal_lm, load_tokenizer  # noqa: F401
from ..integrations.loading import first_line as _first_line
from ..ops.greedy import (
    CausalLMParts,
    final_hidden,
    greedy_decode,
    head_bias,
    head_pack_for,
    split_causal_lm,
    top2_margin,
)
from ..ops.memscore import ExampleScores, memscore_examples

log = logging.getLogger(__name__)

VERIFY_MODES = ("none", "margin", "full")
# default top-1 minus top-2 logit gap below which ``verify="margin"`` re-decodes a row: a few times the
# difference a full-sequence pass and a KV-cache pass can show in the logits at that precision
DEFAULT_TIE_MARGIN = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 0.25}


class ScoringInputError(ValueError):
    """Bad input to scoring or extraction (reported as a one-line error before any work starts)."""


# --- results ------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    """Per-example teacher-forced scores, all ``[N]`` on the CPU.

    ``exact``: greedy decoding from the prefix reproduces the whole suffix. ``first_mismatch``: offset in
    the suffix of the first token it does not reproduce (``suffix_len`` when none). ``matched``: suffix
    tokens whose teacher-forced argmax is right (``fractional`` = matched / suffix_len; this is the
    teacher-forced accuracy, which after the first miss is not the decoded fractional score -- use
    :func:`extract` for that). ``mean_nll``: mean NLL of the suffix tokens (None unless ``need_nll``).
    ``verified``: rows that were re-decoded; ``disagree``: indices of re-decoded rows whose decoding gave
    another exact bit or first mismatch than the teacher-forced pass (their ``exact`` and
    ``first_mismatch`` are then the decoded ones).
    """

    exact: torch.Tensor
    first_mismatch: torch.Tensor
    matched: torch.Tensor
    suffix_len: torch.Tensor
    mean_nll: torch.Tensor | None = None
    verified: torch.Tensor | None = None
    disagree: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def fractional(self) -> torch.Tensor:
        return self.matched.double().div(self.suffix_len.clamp(min=1)).float()

    def __len__(self) -> int:
        return int(self.exact.shape[0])


@dataclass
class ExtractResult:
    """Greedy extraction, all on the CPU.

    ``tokens`` ``[N, k]``: the generated tokens; with ``stop_on_mismatch`` a row stops right after its
    first wrong token and its later entries are -1. ``matched`` ``[N]``: generated tokens equal to the
    reference suffix, position by position over all ``k`` (with ``stop_on_mismatch``: the tokens before
    the first miss). ``fractional`` = matched / k, the Pythia-style score (memorized iff 1).
    ``first_mismatch``: first differing position (``k`` when none); ``exact``: all ``k`` equal.
    ``decoded``: rows that went through the decoder step by step (the others were found exactly memorized,
    with no near-tie, by trying their reference as a draft, and their tokens are their reference suffix).
    """

    tokens: torch.Tensor
    matched: torch.Tensor
    first_mismatch: torch.Tensor
    exact: torch.Tensor
    suffix_len: int
    stopped: bool = False
    decoded: torch.Tensor | None = None  # [N] bool: rows decoded step by step (the others accepted as drafts)

    @property
    def fractional(self) -> torch.Tensor:
        return self.matched.double().div(max(1, self.suffix_len)).float()

    def __len__(self) -> int:
        return int(self.exact.shape[0])


# --- validation -----------------------------------------------------------------------------------------


def _window(ids: torch.Tensor, prefix_len, suffix_len) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-row (start, length) of the scored suffix as int64 ``[N]`` tensors, and whether they are uniform."""
    n, length = ids.shape
    p = torch.as_tensor(prefix_len, dtype=torch.long).cpu().expand(n).clone()
    k = torch.as_tensor(suffix_len, dtype=torch.long).cpu().expand(n).clone()
    uniform = n == 0 or (bool((p == p[0]).all()) and bool((k == k[0]).all()))
    if n and bool((p < 1).any()):
        raise ScoringInputError(f"prefix_len must be >= 1 (a non-empty prompt), got {int(p.min())}")
    if n and bool((k < 1).any()):
        raise ScoringInputError(f"suffix_len must be >= 1, got {int(k.min())}")
    if n and bool((p + k > length).any()):
        r = int((p + k > length).nonzero()[0])
        raise ScoringInputError(f"prefix_len + suffix_len = {int(p[r] + k[r])} is longer than sequence {r} "
                                f"({length} tokens); use shorter windows or longer sequences")
    return p, k, uniform


def as_id_matrix(ids) -> torch.Tensor:
    """``ids`` as an int64 ``[N, L]`` CPU tensor (shape and type checks only)."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise ScoringInputError(f"token ids must be a 2-D [N, L] array, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ScoringInputError(f"token ids must be integers, got {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ScoringInputError(f"empty input: no token ids (shape {tuple(ids.shape)})")
    return ids.detach().to("cpu", torch.long)


def validate_ids(ids, parts: CausalLMParts, ends: torch.Tensor | int | None = None) -> torch.Tensor:
    """``ids`` as an int64 ``[N, L]`` CPU tensor, checked against the model: every id before ``ends``
    (per row; all of them when None) in the vocabulary, and the longest window within the context."""
    ids = as_id_matrix(ids)
    n, length = ids.shape
    ends = torch.as_tensor(length if ends is None else ends, dtype=torch.long).expand(n)
    need = int(ends.max())
    bad = (ids < 0) | (ids >= parts.vocab_size)
    bad[:, :need] &= torch.arange(min(need, length))[None] < ends[:, None]
    bad[:, need:] = False
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ScoringInputError(f"token id {int(ids[r, c])} in sequence {r} (position {c}) is outside the "
                                f"model's vocabulary [0, {parts.vocab_size}); wrong tokenizer?")
    if parts.max_positions is not None and need > parts.max_positions:
        raise ScoringInputError(f"prefix_len + suffix_len = {need} exceeds the model's context of "
                                f"{parts.max_positions} positions")
    return ids


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScoringInputError(f"batch_size must be a positive int, got {batch_size!r}")


class _eval_mode:
    """Eval mode for the duration of a call, then every module's previous mode back (scoring is called from
    inside training loops)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def _model_dtype(parts: CausalLMParts) -> torch.dtype:
    return parts.head_weight.dtype if parts.head_weight is not None else next(parts.model.parameters()).dtype


# --- teacher-forced scoring -----------------------------------------------------------------------------


def _torch_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, need_nll: bool):
    """Per-example reductions from materialised logits: the path for models whose head is not a plain
    linear layer (logit scaling / soft-capping)."""
    from ..ops.memscore import TokenScores, reduce_scores

    match = (logits.argmax(-1) == targets) & mask
    if need_nll:
        lp = torch.log_softmax(logits.float(), -1)
        nll = -lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    else:
        nll = torch.zeros(match.shape, dtype=torch.float32, device=match.device)
    return reduce_scores(TokenScores(match, nll, need_nll), mask)


def score_exact(model, ids, prefix_len, suffix_len, *, batch_size: int = 64, verify: bool | str = False,
                tie_margin: float | None = None, need_nll: bool = False, count_matched: bool = True,
                suppress_ids=None, backend: str | None = None, progress: bool = False) -> ScoreResult:
    """Exact-memorization scores of ``ids[:, p:p+k]`` given ``ids[:, :p]``, from one teacher-forced pass.

    ``ids``: int ``[N, L]`` with ``L >= p + k``; ``prefix_len`` / ``suffix_len``: ints, or int64 ``[N]``
    tensors for per-row windows (rows are then cut at their batch's longest window). ``verify``: ``False`` /
    ``"none"``; ``True`` / ``"margin"`` re-decodes (real greedy decoding with a KV cache) the rows whose top-1
    minus top-2 logit gap at a suffix position up to the first miss is below ``tie_margin`` (default by
    dtype: :data:`DEFAULT_TIE_MARGIN`); ``"full"`` re-decodes every row. ``suppress_ids``: token ids that
    greedy decoding may never pick (``suppress_eos`` of SPEC 4.5), applied as a ``-inf`` logit here too.
    ``need_nll``: also the per-example mean NLL of the suffix (no early exit then). ``count_matched=False``:
    only the exact bit and the first mismatch are wanted, so a row's suffix positions are scored in growing
    stages (4, 8, 16, ... positions) and nothing after its first miss is scored; ``matched`` then counts the
    tokens before the first miss (no effect with ``need_nll`` or per-row windows). The model runs in eval
    mode (its modes are restored afterwards).
    """
    with _eval_mode(model), torch.no_grad():
        return _score_exact(model, ids, prefix_len, suffix_len, batch_size, verify, tie_margin, need_nll,
                            suppress_ids, backend, progress, count_matched)


def _score_exact(model, ids, prefix_len, suffix_len, batch_size, verify, tie_margin, need_nll, suppress_ids,
                 backend, progress, count_matched=True) -> ScoreResult:
    mode = {False: "none", True: "margin", None: "none"}.get(verify, verify)
    if mode not in VERIFY_MODES:
        raise ScoringInputError(f"verify must be one of {VERIFY_MODES} (or a bool), got {verify!r}")
    result, suspect, parts, ids, p, k = _teacher_forced(model, ids, prefix_len, suffix_len, batch_size,
                                                        mode == "margin", tie_margin, need_nll, suppress_ids,
                                                        backend, progress, count_matched=count_matched)
    if mode != "none":
        n = len(result)
        rows = torch.arange(n) if mode == "full" else suspect.nonzero().reshape(-1)
        result.verified = torch.zeros(n, dtype=torch.bool)
        result.verified[rows] = True
        if rows.numel():
            _redecode(model, parts, ids, p, k, rows, result, batch_size, suppress_ids, backend, progress)
    return result


def _first_miss_staged(h, targets, weight, bias, backend) -> ExampleScores:
    """Exact bit and first mismatch of ``k`` suffix positions (``matched``: the tokens before the miss),
    scored in stages of 4, 8, 16, ... positions over the rows still without a miss (early exit within
    each)."""
    b, k = targets.shape
    first = torch.full((b,), k, dtype=torch.long, device=h.device)
    alive = torch.arange(b, device=h.device)
    start, width = 0, 4
    while start < k and alive.numel():
        end = min(k, start + width)
        r = memscore_examples(h[alive, start:end], weight, targets[alive, start:end], bias=bias,
                              need_nll=False, early_exit=True, backend=backend)
        miss = ~r.exact
        first[alive[miss]] = start + r.first_mismatch[miss]
        alive = alive[~miss]
        start, width = end, 2 * width
    return ExampleScores(exact=first == k, first_mismatch=first, matched=first.clone(), mean_nll=None)


def _teacher_forced(model, ids, prefix_len, suffix_len, batch_size, want_margin, tie_margin, need_nll,
                    suppress_ids, backend, progress, count_matched=True):
    """The one teacher-forced pass: (ScoreResult, near-tie rows [N] bool (all False unless
    ``want_margin``), parts, ids, p [N], k [N])."""
    _check_batch_size(batch_size)
    parts = split_causal_lm(model)
    ids = as_id_matrix(ids)
    p, k, uniform = _window(ids, prefix_len, suffix_len)
    ends = p + k
    validate_ids(ids, parts, ends)
    n = ids.shape[0]
    bias = head_bias(parts, suppress_ids) if parts.fused else None
    dtype = _model_dtype(parts)
    margin = DEFAULT_TIE_MARGIN.get(dtype, 1e-3) if tie_margin is None else float(tie_margin)
    exact = torch.zeros(n, dtype=torch.bool)
    first = torch.zeros(n, dtype=torch.long)
    matched = torch.zeros(n, dtype=torch.long)
    nll = torch.zeros(n, dtype=torch.float32) if need_nll else None
    suspect = torch.zeros(n, dtype=torch.bool)
    bar = tqdm(total=n, unit="seq", desc="score", disable=not progress, dynamic_ncols=True)
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        lo, hi = int(p[i:j].min()), int(ends[i:j].max())
        x = ids[i:j, :hi]
        # the last token of the window is only a target: its hidden state is never needed
        pos = torch.arange(lo, hi)
        mask = (pos[None] >= p[i:j, None]) & (pos[None] < ends[i:j, None])
        targets = x[:, lo:hi]
        if parts.fused:
            h = final_hidden(parts, x[:, : hi - 1])[:, lo - 1: hi - 1]
            h = h.to(parts.head_device, parts.head_weight.dtype)  # e.g. under autocast
            dev = h.device
            if uniform and not need_nll and not count_matched:
                r = _first_miss_staged(h, targets.to(dev), parts.head_weight, bias, backend)
            else:
                m_dev = None if uniform else mask.to(dev)
                r = memscore_examples(h, parts.head_weight, targets.to(dev), bias=bias, mask=m_dev,
                                      need_nll=need_nll, early_exit=not need_nll, backend=backend)
        else:
            h = model(input_ids=x[:, : hi - 1].to(parts.input_device)).logits[:, lo - 1: hi - 1]
            if suppress_ids:
                h[..., list(suppress_ids)] = float("-inf")
            dev = h.device
            r = _torch_scores(h, targets.to(dev), mask.to(dev), need_nll)
        exact[i:j] = r.exact.cpu()
        first[i:j] = r.first_mismatch.cpu()
        matched[i:j] = r.matched.cpu()
        if need_nll:
            nll[i:j] = r.mean_nll.cpu()
        if want_margin:
            # a near-tie decides the result only up to the first miss; later positions cannot matter
            rank = torch.cumsum(mask, 1) - 1
            keep = (mask & (rank <= first[i:j, None])).to(dev)
            gap = top2_margin(parts, h, keep, bias).cpu()
            suspect[i:j] = gap < margin
        bar.update(j - i)
    bar.close()
    return ScoreResult(exact, first, matched, k, nll), suspect, parts, ids, p, k


def _redecode(model, parts, ids, p, k, rows, result: ScoreResult, batch_size, suppress_ids, backend,
              progress) -> None:
    """Greedy-decode ``rows`` and overwrite their exact bit and first mismatch with the decoded truth."""
    log.info("verify: re-decoding %d of %d rows", rows.numel(), len(result))
    bad = []
    # rows sharing (p, k) decode together (no padding)
    keys = torch.stack([p[rows], k[rows]], 1)
    for pk in torch.unique(keys, dim=0).tolist():
        sel = rows[(keys == torch.tensor(pk)).all(1)]
        pp, kk = pk
        dec = extract(model, ids[sel, : pp + kk], pp, kk, batch_size=batch_size, stop_on_mismatch=True,
                      prescreen=False, suppress_ids=suppress_ids, backend=backend, progress=progress)
        differ = (dec.exact != result.exact[sel]) | (dec.first_mismatch != result.first_mismatch[sel])
        if bool(differ.any()):
            bad.append(sel[differ])
        result.exact[sel] = dec.exact
        result.first_mismatch[sel] = dec.first_mismatch
    result.disagree = torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long)
    if result.disagree.numel():
        log.warning("verify: %d row(s) decode differently from the teacher-forced pass (near-ties): %s",
                    result.disagree.numel(), result.disagree[:20].tolist())


# --- extraction -------------------------------------------------------------------------------------------


def extract(model, ids, prefix_len: int, suffix_len: int, *, batch_size: int = 64,
            stop_on_mismatch: bool = False, prescreen: bool = True, tie_margin: float | None = None,
            suppress_ids=None, backend: str | None = None, progress: bool = False) -> ExtractResult:
    """Greedy-decode ``suffix_len`` tokens after ``ids[:, :prefix_len]`` and compare with
    ``ids[:, prefix_len: prefix_len + suffix_len]``.

    Token for token equal to ``model.generate(do_sample=False, max_new_tokens=k, min_new_tokens=k)`` with
    EOS stopping disabled (``eos_token_id=None``). ``stop_on_mismatch``: rows leave the batch at their
    first wrong token (enough for the exact bit; see :class:`ExtractResult` for what that changes).
    ``prescreen``: after the prefix, a row whose first decoded token is its reference's feeds the rest of
    its reference through the model in one pass (the reference as a speculative draft); if every suffix
    position's argmax is the next reference token, each with a top-1 minus top-2 logit gap of at least
    ``tie_margin`` (default by dtype), greedy decoding provably reproduces the suffix (SPEC 4.5), so the row
    is not decoded step by step (``decoded`` is False for it). Other rows cost one token more. The model runs
    in eval mode (its
    modes are restored afterwards).
    """
    with _eval_mode(model), torch.no_grad():
        return _extract(model, ids, prefix_len, suffix_len, batch_size, stop_on_mismatch, prescreen,
                        tie_margin, suppress_ids, backend, progress)


def _extract(model, ids, prefix_len, suffix_len, batch_size, stop_on_mismatch, prescreen, tie_margin,
             suppress_ids, backend, progress) -> ExtractResult:
    _check_batch_size(batch_size)
    for name, v in (("prefix_len", prefix_len), ("suffix_len", suffix_len)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ScoringInputError(f"{name} must be an int for extraction, got {type(v).__name__}")
    parts = split_causal_lm(model)
    ids = as_id_matrix(ids)
    _window(ids, prefix_len, suffix_len)
    validate_ids(ids, parts, prefix_len + suffix_len)
    n, p, k = ids.shape[0], prefix_len, suffix_len
    tokens = torch.full((n, k), -1, dtype=torch.long)
    matched = torch.zeros(n, dtype=torch.long)
    first = torch.zeros(n, dtype=torch.long)
    decoded = torch.ones(n, dtype=torch.bool)
    margin = tie_margin
    if margin is None:
        margin = DEFAULT_TIE_MARGIN.get(_model_dtype(parts), 1e-3) if parts.head_weight is not None else 0.0
    pack = head_pack_for(parts) if backend in (None, "cpp") else None  # once for every batch
    bar = tqdm(total=n, unit="seq", desc="extract", disable=not progress, dynamic_ncols=True)
    pool: list[torch.Tensor] = []  # rows the drafts left over in small numbers, decoded in full batches

    def decode(rows, draft):
        out = greedy_decode(model, ids[rows, :p], k, reference=ids[rows, p: p + k],
                            stop_on_mismatch=stop_on_mismatch, suppress_ids=suppress_ids, draft=draft,
                            tie_margin=margin, backend=backend, parts=parts, head_pack=pack,
                            defer_fewer_than=batch_size // 2 if draft else 0)
        done = ~out.deferred.cpu()
        fin = rows[done]
        tokens[fin] = out.tokens.cpu()[done]
        matched[fin] = out.matched.cpu()[done]
        first[fin] = out.first_mismatch.cpu()[done]
        if out.accepted is not None:
            decoded[rows] = ~out.accepted.cpu()
        bar.update(fin.numel())
        return rows[~done]

    def flush(final):
        nonlocal pool
        rest = torch.cat(pool) if pool else torch.zeros(0, dtype=torch.long)
        while rest.numel() >= batch_size or (final and rest.numel()):
            decode(rest[:batch_size], False)
            rest = rest[batch_size:]
        pool = [rest] if rest.numel() else []

    for i in range(0, n, batch_size):
        left = decode(torch.arange(i, min(n, i + batch_size)), prescreen)
        if left.numel():
            pool.append(left)
            flush(False)
    flush(True)
    bar.close()
    return ExtractResult(tokens, matched, first, first == k, k, stop_on_mismatch, decoded)


# --- model and input loading ------------------------------------------------------------------------------

def check_tokenizer(tokenizer, model, name: str = "the tokenizer") -> None:
    """A tokenizer with more tokens than the model's vocabulary does not belong to it (a smaller one may:
    checkpoints often pad their embedding matrix)."""
    vocab = split_causal_lm(model).vocab_size
    if len(tokenizer) > vocab:
        raise ScoringInputError(f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocabulary "
                                f"has {vocab}: they do not belong together")


def _line_ids(obj, lineno: int, path: str, tokenizer) -> list[int]:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict) or not (("ids" in obj) ^ ("text" in obj)):
        raise ScoringInputError(f"{where}: expected an object with exactly one of \"ids\" or \"text\"")
    if "ids" in obj:
        seq = obj["ids"]
        if not isinstance(seq, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise ScoringInputError(f"{where}: \"ids\" must be a list of integers")
        bad = next((t for t in seq if not 0 <= t < 2**63), None)
        if bad is not None:
            raise ScoringInputError(f"{where}: token id {bad} is not a vocabulary index (0 <= id < 2**63)")
        return seq
    if not isinstance(obj["text"], str):
        raise ScoringInputError(f"{where}: \"text\" must be a string")
    if tokenizer is None:
        raise ScoringInputError(f"{where}: a \"text\" line needs a tokenizer (--tokenizer DIR)")
    # no BOS or other special tokens: the ids are the text's own tokens (SPEC 4.4)
    return list(tokenizer(obj["text"], add_special_tokens=False)["input_ids"])


def load_sequences(path: str, tokenizer=None) -> list[list[int]] | torch.Tensor:
    """Token sequences from ``.jsonl`` (one ``{"ids": [...]}`` or ``{"text": "..."}`` per line; blank
    lines skipped), ``.npy`` (an integer array ``[N, L]``) or ``.pt`` (an integer tensor ``[N, L]``, loaded
    with ``weights_only=True``). Returns a tensor for array inputs, else a list of lists."""
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        out = []
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ScoringInputError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ScoringInputError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                out.append(_line_ids(obj, lineno, path, tokenizer))
        if not out:
            raise ScoringInputError(f"{path}: empty input (no sequences)")
        return out
    if ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ScoringInputError(f"{path}: not a readable .npy array ({exc})") from None
        if arr.dtype.kind not in "iu":
            raise ScoringInputError(f"{path}: token ids must be an integer array, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64))
    elif ext == ".pt":
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types; all mean the same to the user
            raise ScoringInputError(f"{path}: cannot load a tensor with weights_only=True "
                                    f"({_first_line(exc)})") from None
        if not isinstance(t, torch.Tensor):
            raise ScoringInputError(f"{path}: expected a tensor of token ids, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ScoringInputError(f"{path}: token ids must be an integer tensor, got {t.dtype}")
    else:
        raise ScoringInputError(f"{path}: unknown input format {ext!r}; use .jsonl, .npy or .pt")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.numel() == 0:
        raise ScoringInputError(f"{path}: expected a non-empty [N, L] array of token ids, "
                                f"got shape {tuple(t.shape)}")
    return t.long()


def to_matrix(seqs, need: int) -> torch.Tensor:
    """Cut every sequence to its first ``need`` tokens and stack them into ``[N, need]``."""
    if isinstance(seqs, torch.Tensor):
        if seqs.shape[1] < need:
            raise ScoringInputError(f"prefix_len + suffix_len = {need} is longer than the sequences "
                                    f"({seqs.shape[1]} tokens)")
        return seqs[:, :need]
    if not seqs:
        raise ScoringInputError("empty input (no sequences)")
    for r, s in enumerate(seqs):
        if len(s) < need:
            raise ScoringInputError(f"sequence {r} has {len(s)} tokens, fewer than prefix_len + suffix_len = "
                                    f"{need}")
    return torch.tensor([s[:need] for s in seqs], dtype=torch.long)


# --- the command line ---------------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    atomic.write_text(path, write)


def score_for_mode(model, ids: torch.Tensor, p: int, k: int, *, command: str, mode: str, batch_size: int,
                   verify: bool | str, need_nll: bool, stop_on_mismatch: bool, backend: str | None,
                   progress: bool, suppress_ids=None, exact_only: bool = False) -> dict[str, torch.Tensor]:
    """The per-example columns ``tinymem score``/``extract`` write, as ``[N]`` (or ``[N, k]``) tensors.
    ``exact_only``: no teacher-forced matched count (``score_exact(count_matched=False)``)."""
    cols: dict[str, torch.Tensor] = {}
    if command == "extract":
        e = extract(model, ids, p, k, batch_size=batch_size, stop_on_mismatch=stop_on_mismatch,
                    suppress_ids=suppress_ids, backend=backend, progress=progress)
        return {"exact": e.exact, "first_mismatch": e.first_mismatch, "matched": e.matched,
                "fractional": e.fractional, "tokens": e.tokens}
    if mode in ("exact", "both"):
        s = score_exact(model, ids, p, k, batch_size=batch_size, verify=verify, need_nll=need_nll,
                        count_matched=not exact_only, suppress_ids=suppress_ids, backend=backend,
                        progress=progress)
        cols.update(exact=s.exact, first_mismatch=s.first_mismatch)
        if not exact_only or need_nll:
            cols.update(matched_tf=s.matched, fractional_tf=s.fractional)
        if need_nll:
            cols["nll"] = s.mean_nll
        if s.verified is not None:
            cols["verified"] = s.verified
            dis = torch.zeros(len(s), dtype=torch.bool)
            dis[s.disagree] = True
            cols["disagree"] = dis
    if mode in ("fractional", "both"):
        if mode == "both":
            # an exactly memorized row decodes to its suffix: fractional 1 without decoding it
            todo = (~cols["exact"]).nonzero().reshape(-1)
            matched = torch.full((ids.shape[0],), k, dtype=torch.long)
            if todo.numel():
                e = extract(model, ids[todo], p, k, batch_size=batch_size, prescreen=False,
                            suppress_ids=suppress_ids, backend=backend, progress=progress)
                matched[todo] = e.matched
        else:
            e = extract(model, ids, p, k, batch_size=batch_size, suppress_ids=suppress_ids, backend=backend,
                        progress=progress)
            matched = e.matched
            cols.update(exact=e.exact, first_mismatch=e.first_mismatch)
        cols["matched"] = matched
        cols["fractional"] = matched.double().div(k).float()
    return cols


def run_command(args, command: str) -> dict | None:
    """``tinymem score`` / ``tinymem extract`` (``args`` from :func:`tinymem_fast.cli.build_parser`); returns
    the summary on rank 0 (None on the other ranks). Under ``torchrun`` the examples are split into
    contiguous shards, one per rank, and rank 0 writes the gathered results. Bad input raises
    :class:`ScoringInputError` (or ``FileNotFoundError``) before any scoring starts."""
    from . import distributed as dist_

    ctx = dist_.init_from_env(args.device)
    failure = None
    try:
        if args.prefix_len < 1 or args.suffix_len < 1:
            raise ScoringInputError("--prefix-len and --suffix-len must be >= 1")
        if args.batch_size < 1:
            raise ScoringInputError("--batch-size must be >= 1")
        # the input first: a malformed file is reported before a possibly large model is loaded
        tok_dir = args.tokenizer
        tokenizer = load_tokenizer(tok_dir) if tok_dir else None
        try:
            seqs = load_sequences(args.input, tokenizer)
        except ScoringInputError as exc:
            if tokenizer is None and "needs a tokenizer" in str(exc) and has_tokenizer(args.model):
                tok_dir = args.model
                tokenizer = load_tokenizer(tok_dir)
                seqs = load_sequences(args.input, tokenizer)
            else:
                raise
        need = args.prefix_len + args.suffix_len
        ids = to_matrix(seqs, need)
        model = load_causal_lm(args.model, args.dtype, device=None if args.device_map else ctx.device,
                               device_map=args.device_map)
        if tokenizer is not None:
            check_tokenizer(tokenizer, model, tok_dir)
        parts = split_causal_lm(model)
        validate_ids(ids, parts, need)
    except (ValueError, FileNotFoundError) as exc:
        if not ctx.active:
            raise
        failure = exc
    except BaseException:
        dist_.finish(ctx, barrier=False)
        raise
    if ctx.active:  # every rank hears every rank's verdict on its input before any rank starts
        dist_.agree_on_work(ctx, failure, None if failure else ids, ScoringInputError)
    n = ids.shape[0]
    lo, hi = dist_.shard_bounds(n, ctx.rank, ctx.world_size)
    t0 = time.perf_counter()
    # a rank with an empty shard (more ranks than examples) scores one row and keeps none, so that its
    # columns have the names and shapes the gather expects
    mine = ids[lo:hi] if hi > lo else ids[:1]
    cols = score_for_mode(model, mine, args.prefix_len, args.suffix_len, command=command,
                          mode=getattr(args, "mode", "fractional"), batch_size=args.batch_size,
                          verify=getattr(args, "verify", False), need_nll=getattr(args, "nll", False),
                          stop_on_mismatch=getattr(args, "stop_on_mismatch", False), backend=args.backend,
                          exact_only=getattr(args, "exact_only", False),
                          progress=not args.quiet and ctx.rank == 0,
                          suppress_ids=eos_ids(model) if getattr(args, "suppress_eos", False) else None)
    if hi == lo:
        cols = {c: v[:0] for c, v in cols.items()}
    cols = dist_.gather_columns(cols, n, ctx)
    dist_.sync_device(parts.head_device)
    wall = time.perf_counter() - t0
    summary = None
    if ctx.rank == 0:
        summary = _summary(cols, args, command, n, wall, parts, ctx)
        _write_outputs(args.out, command, cols, summary)
    dist_.finish(ctx)
    return summary


def eos_ids(model) -> list[int]:
    """The model's EOS token ids (generation config first, then model config); [] when it has none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size
    bad = [e for e in ids if not 0 <= e < vocab]
    if bad:
        raise ScoringInputError(f"the model's EOS id {bad[0]} is outside its vocabulary of {vocab}: fix "
                                "eos_token_id in config.json / generation_config.json, or no --suppress-eos")
    return ids


def _summary(cols, args, command, n, wall, parts, ctx) -> dict:
    s = {"command": command, "model": os.path.abspath(args.model), "input": os.path.abspath(args.input),
         "n": n, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "dtype": args.dtype,
         "batch_size": args.batch_size, "world_size": ctx.world_size,
         "device": device_name(parts.head_device), "seconds": wall,
         "sequences_per_s": n / wall if wall > 0 else float("inf")}
    if command == "score":
        s["mode"] = args.mode
    if getattr(args, "suppress_eos", False):
        s["suppressed_eos"] = eos_ids(parts.model)
    n_exact = int(cols["exact"].sum())
    s.update(n_exact=n_exact, pct_exact=100.0 * n_exact / max(1, n))
    if "fractional" in cols:
        s["mean_fractional"] = float(cols["fractional"].double().mean())
    if "fractional_tf" in cols:
        s["mean_fractional_teacher_forced"] = float(cols["fractional_tf"].double().mean())
    if "nll" in cols:
        s["mean_nll"] = float(cols["nll"].double().mean())
    if "verified" in cols:
        s["n_verified"] = int(cols["verified"].sum())
        s["n_disagree"] = int(cols["disagree"].sum())
        s["disagree"] = cols["disagree"].nonzero().reshape(-1).tolist()
    return s


def _write_outputs(out: str, command: str, cols: dict, summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    names = list(cols)
    lists = {c: cols[c].tolist() for c in names}

    def rows(f):
        for i in range(summary["n"]):
            rec = {"index": i}
            for c in names:
                rec[c] = lists[c][i]
            f.write(json.dumps(rec) + "\n")

    _atomic_write(os.path.join(out, f"{command}.jsonl"), rows)
    _atomic_write(os.path.join(out, "summary.json"), lambda f: json.dump(summary, f, indent=1))
