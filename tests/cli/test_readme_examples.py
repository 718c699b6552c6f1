"""The README's Python examples run as written (the model path and input file swapped for tiny ones)."""

import os
import re

import torch
from scoring_models import planted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")


def _blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_readme_examples_run(tmp_path, capsys):
    score, train, subnet, ops = _blocks()
    model, secret, _ = planted("gpt2")
    model.save_pretrained(tmp_path / "model")
    torch.save(torch.cat([secret, secret]), tmp_path / "seqs.pt")   # 16 rows of 28 tokens
    path = repr(str(tmp_path / "model"))
    code = score.replace('"path/to/hf-model", "bfloat16"', f'{path}, "float32"')
    code = code.replace('"seqs.pt"', repr(str(tmp_path / "seqs.pt")))
    # the tiny model's context is 40 positions: an 8 + 16 window instead of 32 + 40
    code = code.replace("prefix_len=32, suffix_len=40", "prefix_len=8, suffix_len=16")
    code = code.replace("extract(model, ids, 32, 40)", "extract(model, ids, 8, 16)")
    scope: dict = {}
    exec(compile(code, "README score block", "exec"), scope)
    assert scope["s"].exact.shape == (16,) and scope["e"].tokens.shape == (16, 16)
    assert torch.equal(scope["s"].exact, scope["e"].exact)   # one pass = greedy decoding
    assert bool(scope["s"].exact.all())                       # the planted rows are memorized
    assert "tensor" in capsys.readouterr().out

    # the training block continues in the same session (ids from above)
    exec(compile(train.replace('"path/to/hf-model"', path), "README train block", "exec"), scope)
    assert scope["model"].__dict__.get("_tinymem_patch") is not None
    assert torch.isfinite(scope["loss"]) and scope["W"].grad is not None and scope["hidden"].grad is not None
    before = {n: p.detach().clone() for n, p in scope["model"].named_parameters()}
    exec(compile(subnet, "README subnet block", "exec"), scope)
    after = dict(scope["model"].named_parameters())
    assert after.keys() == before.keys()                      # folded: the plain module tree again
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed and all(".mlp." in n and n.endswith(".weight") for n in changed)  # only masked weights

    exec(compile("import torch\n" + ops, "README ops block", "exec"), {})
    assert "tensor" in capsys.readouterr().out
