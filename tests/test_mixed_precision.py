"""bf16 mixed-precision training: float32 attention on the CPU, config restored, loss close to float32,
deterministic steps (exact resume relies on it), bad settings refused."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import rule_rows, tiny
from tinymem_fast.models.mixed_precision import FP32_ATTENTION, _register, autocast, check_precision
from tinymem_fast.training import TrainConfig, Trainer


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_attention_runs_in_float32_inside_the_bf16_region(arch, monkeypatch):
    model = tiny(arch).eval()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    x = rule_rows(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        seen.clear()
        with autocast(model, "bf16", "cpu"):
            got = model(x).logits
    assert model.config._attn_implementation == "sdpa"
    assert seen == [(torch.float32,) * 3 + (False,)] * model.config.num_hidden_layers
    assert got.dtype == torch.bfloat16  # the matmuls did run in bf16
    err = (got.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


def test_fp32_attention_equals_float32_sdpa_on_the_upcast_inputs():
    _register()
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping[FP32_ATTENTION]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g).bfloat16() for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fn(module, q, k, v, None, scaling=0.25)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=0.25)
    assert out.dtype == torch.bfloat16
    # the only difference is the final rounding of the output to bf16
    assert torch.equal(out, ref.transpose(1, 2).bfloat16())


def test_config_restored_on_error_and_never_saved(tmp_path):
    model = tiny("gpt2")
    with pytest.raises(RuntimeError, match="boom"):
        with autocast(model, "bf16", "cpu"):
            assert model.config._attn_implementation == FP32_ATTENTION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert FP32_ATTENTION not in (tmp_path / "config.json").read_text()


def _train(precision, steps=4):
    model = tiny("gpt2")
    cfg = TrainConfig(lr=3e-3, batch_size=8, precision=precision)
    tr = Trainer(model, cfg)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for s in range(steps):
        x = rule_rows(8, gen)
        losses.append(tr.step(x, torch.zeros_like(x, dtype=torch.bool), s).item())
    return model, losses


def test_bf16_steps_track_float32_and_are_deterministic():
    m32, l32 = _train("fp32")
    m16, l16 = _train("bf16")
    m16b, l16b = _train("bf16")
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # master weights stay float32
    assert l16 == l16b
    for a, b in zip(m16.state_dict().values(), m16b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(l32, l16, strict=True):
        assert abs(a - b) < 0.02 * a, (l32, l16)
    assert l16[-1] < l16[0]  # it learns
    assert l32 != l16  # bf16 really ran


def test_bad_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        Trainer(tiny("gpt2"), TrainConfig(precision="half"))
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", "train", "--set", "train.precision=fp16",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown precision" in r.stderr
    assert not (tmp_path / "checkpoints").exists()
