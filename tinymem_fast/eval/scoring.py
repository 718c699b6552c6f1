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

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..ops.checks import check_values
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
    check_values(h, weight, targets, vocab=weight.shape[0])  # once: the stages below score subsets
    while start < k and alive.numel():
        end = min(k, start + width)
        r = memscore_examples(h[alive, start:end], weight, targets[alive, start:end], bias=bias,
                              need_nll=False, early_exit=True, backend=backend, validate=False)
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


# --- the columns of `tinymem score` / `tinymem extract` -----------------------------------------


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
