"""The one-pass teacher-forced memorization test equals greedy decoding with Hugging Face generate."""

import pytest
import torch

from tinymem_fast.tinymem.memorization import score_windows
from tinymem_fast.tinymem.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def model():
    m = build_model(ModelConfig(n_layer=2, d_model=32, n_head=2, d_mlp=64), vocab_size=14, max_ctx=40, seed=0)
    return m


def greedy(model, prefix: torch.Tensor, k: int) -> torch.Tensor:
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=k,
                         min_new_tokens=k, do_sample=False, pad_token_id=13, eos_token_id=None)
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_teacher_forced_bits_equal_generate(model, batch_size):
    gen = torch.Generator().manual_seed(0)
    p, k, n = 7, 12, 24
    prefix = torch.randint(0, 14, (n, p), generator=gen)
    target = greedy(model, prefix, k)              # memorized by construction
    perturbed = target.clone()
    offsets = torch.randint(0, k, (n,), generator=gen)
    flip = torch.arange(n) % 2 == 1
    for r in flip.nonzero().reshape(-1).tolist():
        j = p + int(offsets[r])
        perturbed[r, j] = (perturbed[r, j] + 1) % 14
    s = score_windows(model, perturbed, p, p + k, batch_size=batch_size)
    assert torch.equal(s.match, ~flip)
    assert torch.equal(s.first_mismatch[flip], offsets[flip])
    assert torch.equal(s.first_mismatch[~flip], torch.full((int((~flip).sum()),), k))
    # and the generate side agrees row by row: decoding each perturbed row's prompt never yields it
    regen = greedy(model, perturbed[:, :p], k)
    assert torch.equal((regen[:, p:] == perturbed[:, p: p + k]).all(1), s.match)


def test_variable_windows_and_errors(model):
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 14, (5, 4), generator=gen)
    full = greedy(model, prefix, 20)
    s = score_windows(model, full, torch.tensor([4, 5, 6, 7, 8]), torch.tensor([24, 24, 20, 10, 9]))
    assert s.match.all() and torch.equal(s.accuracy, torch.ones(5))
    with pytest.raises(ValueError, match="start < end"):
        score_windows(model, full, 5, 5)
