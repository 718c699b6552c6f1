"""Oracles and comparisons shared by the memscore tests (CPU, Triton, CUDA).

The oracle is deliberately naive: the full ``[M, V]`` logits, ``torch.argmax`` and ``log_softmax``.
Backends accumulate dot products in different orders, so two backends may round a logit differently in
the last float32 bit (or, after rounding to fp16/bf16, by one half-precision ulp). Where that flips an
argmax the top two logits are within that rounding of each other; the comparisons below allow exactly
that and nothing more. Quantised inputs (``quantised_problem``) make every logit exact in any order, and
there every backend must agree with the oracle bit for bit.
"""

from __future__ import annotations

import torch

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def naive_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Full logits as the op defines them: fp32 accumulation, rounded once to the input dtype."""
    lg = h.float() @ w.float().t()
    if b is not None:
        lg = lg + b.float()
    return lg.to(h.dtype).float()


def exact_logits(h, w, b) -> torch.Tensor:
    lg = h.double() @ w.double().t()
    return lg + b.double() if b is not None else lg


def naive_scores(h, w, b, y):
    """-> (argmax [M], match [M], nll [M]) from the full rounded logits."""
    lg = naive_logits(h, w, b)
    arg = torch.argmax(lg, dim=-1)
    nll = -torch.log_softmax(lg, dim=-1).gather(-1, y[:, None]).squeeze(-1)
    return arg, arg == y, nll


def tie_tol(top: torch.Tensor, dtype) -> torch.Tensor:
    """How far apart two logits may be and still be ordered differently by two correct backends."""
    return 2 * EPS[dtype] * top.abs().clamp_min(1.0) + 1e-4


def assert_argmax_close(arg: torch.Tensor, ref_arg: torch.Tensor, logits: torch.Tensor, dtype,
                        max_frac: float = 0.02) -> None:
    """Equal argmax, except at near-ties of the reference logits."""
    arg, ref_arg, logits = arg.cpu(), ref_arg.cpu(), logits.cpu()
    diff = (arg != ref_arg).nonzero().squeeze(1)
    if diff.numel():
        a = logits[diff, arg[diff]]
        r = logits[diff, ref_arg[diff]]
        gap = (a - r).abs()
        assert (gap <= tie_tol(r, dtype)).all(), f"argmax differs beyond a near-tie at rows {diff.tolist()}"
    assert diff.numel() <= max(1, max_frac * arg.numel()), f"{diff.numel()} of {arg.numel()} argmaxes differ"


def assert_match_close(match: torch.Tensor, ref_match: torch.Tensor, logits: torch.Tensor,
                       targets: torch.Tensor, dtype, max_frac: float = 0.02) -> None:
    """Equal match bits, except where the target logit ties the top logit within rounding."""
    match, ref_match, logits, targets = match.cpu(), ref_match.cpu(), logits.cpu(), targets.cpu()
    diff = (match != ref_match).nonzero().squeeze(1)
    if diff.numel():
        top = logits[diff].max(-1).values
        tgt = logits[diff, targets[diff]]
        gap = (top - tgt).abs()
        assert (gap <= tie_tol(top, dtype)).all(), f"match differs beyond a near-tie at rows {diff.tolist()}"
    assert diff.numel() <= max(1, max_frac * match.numel()), f"{diff.numel()}/{match.numel()} matches differ"


def nll_tol(dtype) -> tuple[float, float]:
    """(atol, rtol) between two backends' NLLs: fp32 rounding, or one half-precision ulp of the logits."""
    if dtype == torch.float32:
        return 2e-4, 1e-5
    return 4 * EPS[dtype] * 16, 4 * EPS[dtype]


def assert_nll_close(nll: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    atol, rtol = nll_tol(dtype)
    torch.testing.assert_close(nll.cpu(), ref.cpu(), atol=atol, rtol=rtol)


def assert_half_nll_rule(nll: torch.Tensor, h, w, b, y) -> None:
    """Flash-attention rule for half precision: our error against the float64 NLL is at most about twice
    the error of plain torch run in that dtype (F.linear in fp16/bf16, log_softmax in fp32)."""
    ref = -torch.log_softmax(exact_logits(h, w, b), -1).gather(-1, y[:, None]).squeeze(-1)
    plain = torch.nn.functional.linear(h, w, b).float()
    plain_nll = -torch.log_softmax(plain, -1).gather(-1, y[:, None]).squeeze(-1)
    ours = (nll.double().cpu() - ref.cpu()).abs().max().item()
    theirs = (plain_nll.double().cpu() - ref.cpu()).abs().max().item()
    assert ours <= 2 * theirs + 1e-5, f"NLL error {ours:.3g} vs torch {h.dtype} error {theirs:.3g}"


def random_problem(m: int, d: int, v: int, dtype, *, bias: bool, seed: int, hit_frac: float = 0.5,
                   device="cpu"):
    """Random h, W, b, targets; about `hit_frac` of the targets are set to the argmax (so both hits and
    misses occur). Scaled so logits are O(3): realistic softmax, not one-hot."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * (3.0 / d ** 0.5)).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (m,), generator=g)
    arg = torch.argmax(naive_logits(h, w, b), -1)
    hit = torch.rand(m, generator=g) < hit_frac
    y = torch.where(hit, arg, y)
    return h.to(device), w.to(device), (b.to(device) if b is not None else None), y.to(device)


def quantised_problem(m: int, d: int, v: int, dtype, *, bias: bool, seed: int, chunk: int, device="cpu"):
    """Inputs on a coarse grid so every logit is exact in float32 (and in fp16 / bf16 after rounding) in
    any summation order, with forced ties: the best row of each token is duplicated later in the
    vocabulary, once within the same chunk and once a chunk further on. Half of the targets are the
    lowest-index maximum (hits), the other half a later duplicate (misses: torch.argmax takes the lowest).
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (m, d), generator=g).float() * 0.5
    w = torch.randint(-2, 3, (v, d), generator=g).float() * 0.5
    b = torch.randint(-2, 3, (v,), generator=g).float() * 0.5 if bias else None
    # a few "hot" rows that beat the rest, each duplicated at +1 and at +chunk (when inside V)
    hot = torch.randperm(max(1, v // 3), generator=g)[: min(3, v)]
    for i in hot.tolist():
        w[i] = torch.sign(h[i % m]) + 0.0  # aligned with token i % m: the largest possible dot product
        for j in (i + 1, i + chunk):
            if j < v:
                w[j] = w[i]
                if b is not None:
                    b[j] = b[i]
    lg = exact_logits(h, w, b)
    arg = torch.argmax(lg, -1)
    y = arg.clone()
    for t in range(m):
        ties = (lg[t] == lg[t, arg[t]]).nonzero().squeeze(1)
        if t % 2 == 1 and ties.numel() > 1:
            y[t] = ties[-1]  # a later equal logit: a miss
        elif t % 4 == 2:
            y[t] = (arg[t] + 1) % v
    h, w = h.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    assert torch.equal(exact_logits(h, w, b), lg), "grid too fine for this dtype"
    return h.to(device), w.to(device), (b.to(device) if b is not None else None), y.to(device)


def oracle_examples(match: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor | None, has_nll=True):
    """Per-example reductions by a plain Python loop (independent of reduce_scores' tensor tricks)."""
    bsz, seq = match.shape
    exact, first, matched, mean = [], [], [], []
    for r in range(bsz):
        pos = [t for t in range(seq) if mask is None or bool(mask[r, t])]
        hits = [bool(match[r, t]) for t in pos]
        exact.append(all(hits))
        first.append(next((i for i, ok in enumerate(hits) if not ok), len(pos)))
        matched.append(sum(hits))
        vals = [float(nll[r, t]) for t in pos]
        mean.append(sum(vals) / len(vals) if (vals and has_nll) else float("nan"))
    return (torch.tensor(exact), torch.tensor(first), torch.tensor(matched),
            torch.tensor(mean, dtype=torch.float32))
