"""bf16 mixed-precision training: float32 attention on the CPU, config restored, loss close to float32,
deterministic steps (exact resume relies on it), bad settings refused."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import rule_rows, tiny
from tinymem_fast.integrations.mixed_precision import TRAIN_ATTENTION, _register, autocast, check_precision
from tinymem_fast.tinymem.training import TrainConfig, Trainer


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_sdpa_fallback_runs_in_float32_inside_the_bf16_region(arch, monkeypatch):
    monkeypatch.setenv("TINYMEM_BACKEND", "torch")  # the path taken without the compiled kernel
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


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_fused_kernel_path_matches_the_float32_attention_path(arch, monkeypatch):
    from tinymem_fast.ops.attention import causal_attention_available

    if not causal_attention_available():
        pytest.skip("compiled extension without the causal attention kernel")
    model = tiny(arch).eval()
    x = rule_rows(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        with autocast(model, "bf16", "cpu"):
            fused = model(x).logits
        monkeypatch.setenv("TINYMEM_BACKEND", "torch")
        with autocast(model, "bf16", "cpu"):
            sdpa32 = model(x).logits
    # both run attention in float32 on the same bf16 activations: they differ by float32 rounding only,
    # then by at most one bf16 rounding step of the layers after it
    scale = ref.abs().max().item()
    assert (fused.float() - sdpa32.float()).abs().max().item() < 0.02 * scale
    assert (fused.float() - ref).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_masks_survive_the_swap(arch):
    model = tiny(arch).eval()
    x = rule_rows(2, torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding: the fused causal kernel must not be used, and the mask must count
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        plain = model(x).logits
        with autocast(model, "bf16", "cpu"):
            got = model(x, attention_mask=mask).logits.float()
    scale = ref.abs().max().item()
    assert (got[1, 5:] - ref[1, 5:]).abs().max().item() < 0.05 * scale
    # and the mask did change row 1 (else the check above proves nothing)
    assert (plain[1, 5:] - ref[1, 5:]).abs().max().item() > 0.1 * scale


def test_fp32_attention_equals_float32_sdpa_on_the_upcast_inputs(monkeypatch):
    monkeypatch.setenv("TINYMEM_BACKEND", "torch")
    _register()
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping[TRAIN_ATTENTION]
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
            assert model.config._attn_implementation == TRAIN_ATTENTION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert TRAIN_ATTENTION not in (tmp_path / "config.json").read_text()


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
