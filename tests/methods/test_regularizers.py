"""Regularizers (SPEC 5.2): spectral norm (coverage, head split, sigma, gradient), loss truncation (against a
plain reference), example-tied dropout (masks per example, over channels, stable, eval rescaling), exact
resume with each one on, and all three from `tinymem train --regularizer` with their result rows."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_models as tsu
import torch

from tinymem_fast.methods.regularizers import (
    REGULARIZERS,
    ExampleTiedDropout,
    LossTruncation,
    RegularizerConfig,
    SpectralNorm,
    get_regularizer,
)
from tinymem_fast.tinymem.data.dataset import DataConfig, build
from tinymem_fast.tinymem.models import ModelConfig
from tinymem_fast.tinymem.training import TrainConfig, Trainer, build_model_for, token_loss, train

ARCHS = ["gpt2", "gpt_neox", "llama"]
SETTINGS_NAMES = ["spectral_norm", "loss_truncation", "example_tied_dropout"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a busy 2-core machine OpenMP barriers cost 10-50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- spectral norm --------------------------------------------------------------------------------


def _reference_blocks(model, arch):
    """Every covered block as a plain [rows, cols] linear map, sliced straight from the HF weights."""
    c = model.config
    out = []
    if arch == "gpt2":
        d, h = c.n_embd, c.n_head
        hd = d // h
        for blk in model.transformer.h:
            w = blk.attn.c_attn.weight.detach().T            # Conv1D (in, out) -> (out, in)
            out += [w[j * d + i * hd: j * d + (i + 1) * hd] for j in range(3) for i in range(h)]
            w = blk.attn.c_proj.weight.detach().T
            out += [w[:, i * hd:(i + 1) * hd] for i in range(h)]
            out += [blk.mlp.c_fc.weight.detach().T, blk.mlp.c_proj.weight.detach().T]
    elif arch == "gpt_neox":
        d, h = c.hidden_size, c.num_attention_heads
        hd = d // h
        for layer in model.gpt_neox.layers:
            w = layer.attention.query_key_value.weight.detach()
            out += [w[(i * 3 + j) * hd:(i * 3 + j + 1) * hd] for i in range(h) for j in range(3)]
            w = layer.attention.dense.weight.detach()
            out += [w[:, i * hd:(i + 1) * hd] for i in range(h)]
            out += [layer.mlp.dense_h_to_4h.weight.detach(), layer.mlp.dense_4h_to_h.weight.detach()]
    else:
        h, kv = c.num_attention_heads, c.num_key_value_heads
        hd = c.hidden_size // h
        for layer in model.model.layers:
            a = layer.self_attn
            for mod, n in ((a.q_proj, h), (a.k_proj, kv), (a.v_proj, kv)):
                out += [mod.weight.detach()[i * hd:(i + 1) * hd] for i in range(n)]
            out += [a.o_proj.weight.detach()[:, i * hd:(i + 1) * hd] for i in range(h)]
            out += [layer.mlp.gate_proj.weight.detach(), layer.mlp.up_proj.weight.detach(),
                    layer.mlp.down_proj.weight.detach()]
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_spectral_sigma_converges_to_matrix_norm(arch):
    model = tsu.tiny(arch)
    reg = SpectralNorm(model, lam=0.01, power=1, seed=3)
    for _ in range(300):
        reg.sigmas()
    ours = torch.cat(reg.sigmas()).detach().sort().values
    ref = torch.stack([torch.linalg.matrix_norm(w, ord=2) for w in _reference_blocks(model, arch)])
    ref = ref.sort().values
    assert ours.shape == ref.shape          # same number of blocks: heads split, MLP whole
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_spectral_head_blocks_follow_the_models_own_head_split(arch):
    """Q/K/V blocks reproduce one head's projection as the model computes it; output-projection blocks
    sum over heads to the projection."""
    model = tsu.tiny(arch)
    blocks = {b.name.split(".", 2)[-1]: b for b in SpectralNorm(model).blocks if b.name.split(".")[1] == "0"}
    torch.manual_seed(0)
    x = torch.randn(model.config.hidden_size if arch != "gpt2" else model.config.n_embd)
    with torch.no_grad():
        if arch == "gpt2":
            att = model.transformer.h[0].attn
            h = model.config.n_head
            qkv = att.c_attn(x[None]).reshape(-1) - att.c_attn.bias
            d = x.numel()
            per = qkv.view(3, d).view(3, h, d // h)              # HF: split Q|K|V, then heads
            got = torch.einsum("bdk,d->bk", blocks["attn.c_attn"].view(att.c_attn.weight), x).view(3, h, -1)
            torch.testing.assert_close(got, per)
            y = torch.randn(d)
            out = att.c_proj(y[None]).reshape(-1) - att.c_proj.bias
            parts = blocks["attn.c_proj"].view(att.c_proj.weight)   # [h, hd, d]
            torch.testing.assert_close(torch.einsum("hkd,hk->d", parts, y.view(h, -1)), out)
        elif arch == "gpt_neox":
            att = model.gpt_neox.layers[0].attention
            h = model.config.num_attention_heads
            qkv = att.query_key_value(x[None]).reshape(-1) - att.query_key_value.bias
            per = qkv.view(h, 3, -1)                              # HF: [heads, 3 * head_size], then chunk
            split = blocks["attention.query_key_value"].view(att.query_key_value.weight)
            got = torch.einsum("bkd,d->bk", split, x).view(h, 3, -1)
            torch.testing.assert_close(got, per)
            out = att.dense(x[None]).reshape(-1) - att.dense.bias
            parts = blocks["attention.dense"].view(att.dense.weight)   # [h, d, hd]
            torch.testing.assert_close(torch.einsum("hdk,hk->d", parts, x.view(h, -1)), out)
        else:
            att = model.model.layers[0].self_attn
            h = model.config.num_attention_heads
            got = torch.einsum("bkd,d->bk", blocks["self_attn.q_proj"].view(att.q_proj.weight), x)
            torch.testing.assert_close(got, att.q_proj(x).view(h, -1))
            parts = blocks["self_attn.o_proj"].view(att.o_proj.weight)
            torch.testing.assert_close(torch.einsum("hdk,hk->d", parts, x.view(h, -1)), att.o_proj(x))


@pytest.mark.parametrize("power", [1, 2])
def test_spectral_gradient_flows_only_through_sigma(power):
    model = tsu.tiny("gpt2")
    lam = 0.3
    reg = SpectralNorm(model, lam=lam, power=power)
    pen = reg.penalty()
    pen.backward()
    assert not any(t.requires_grad for t in reg.u + reg.v)
    # d/dW of (lam/2) sigma^p with sigma = u^T W v (u, v constants) is (lam/2) p sigma^(p-1) u v^T
    g = next(i for i, (key, _) in enumerate(reg.groups) if key == (192, 48))   # the MLP matrices
    members = [b for b, _ in reg.groups[g][1]]
    assert [b.name for b in members][:2] == ["h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    w = reg.stacked(g).detach()
    sig = torch.einsum("bm,bmn,bn->b", reg.u[g], w, reg.v[g])
    outer = reg.u[g][:, :, None] * reg.v[g][:, None, :]
    outer = (lam / 2) * power * sig[:, None, None] ** (power - 1) * outer
    fc, proj = model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_proj.weight
    torch.testing.assert_close(fc.grad, outer[0].T)      # c_fc (48, 192) was transposed into the group
    torch.testing.assert_close(proj.grad, outer[1])
    torch.testing.assert_close(pen, (lam / 2) * torch.cat(reg.sigmas(iterate=False)).pow(power).sum())
    for name, p in model.named_parameters():           # embeddings, norms and biases are not covered
        if p.dim() < 2 or "wte" in name or "wpe" in name:
            assert p.grad is None, name


def test_spectral_unknown_layouts_fail_clearly():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        OPTConfig,
        OPTForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    cross = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=8,
                                       add_cross_attention=True))
    with pytest.raises(TypeError, match="cross-attention"):
        SpectralNorm(cross)
    fused = Phi3ForCausalLM(Phi3Config(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                       pad_token_id=0))
    with pytest.raises(TypeError, match="spectral_norm"):
        SpectralNorm(fused)
    opt = OPTForCausalLM(OPTConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   ffn_dim=32, word_embed_proj_dim=16))
    with pytest.raises(TypeError):
        SpectralNorm(opt)
    with pytest.raises(TypeError):
        ExampleTiedDropout(opt)


# --- loss truncation ------------------------------------------------------------------------------


def _reference_truncation(stream, batch, drop, size, min_count):
    """Straightforward version: keep every loss, threshold = numpy percentile of the newest ``size``."""
    hist, thr, since, out = [], None, 0, []
    for i in range(0, len(stream), batch):
        b = stream[i:i + batch]
        hist += b
        since += len(b)
        if len(hist) >= max(min_count, size) and (thr is None or since >= size):
            thr = np.percentile(np.array(hist[-size:], dtype=np.float32), 100 * (1 - drop))
            since = 0
        out.append([1.0 if thr is None or x < thr else 0.0 for x in b])
    return out


@pytest.mark.parametrize("batch,size,min_count", [(7, 20, 30), (8, 16, 0), (25, 10, 10)])
def test_loss_truncation_matches_reference(batch, size, min_count):
    gen = torch.Generator().manual_seed(0)
    stream = torch.rand(300, generator=gen).tolist()
    ref = _reference_truncation(stream, batch, 0.3, size, min_count)
    hook = LossTruncation(0.3, size, min_count)
    got = [hook.per_sequence_weights(s, torch.tensor(stream[i:i + batch])).tolist()
           for s, i in enumerate(range(0, len(stream), batch))]
    assert got == ref
    assert any(0.0 in w for w in got)
    first = next(k for k, w in enumerate(got) if 0.0 in w)
    assert (first + 1) * batch >= max(size, min_count)     # nothing dropped before the buffer fills


def test_loss_truncation_batch_loss_is_mean_with_dropped_as_zero():
    model = tsu.tiny("gpt2")
    cfg = TrainConfig(batch_size=8, lr=0.0)                # lr 0: the step does not move the weights
    hook = LossTruncation(drop_frac=0.5, buffer=8, min_count=8)   # threshold = median of this batch
    trainer = Trainer(model, cfg, [hook])
    x = torch.randint(0, tsu.V, (8, tsu.T), generator=torch.Generator().manual_seed(1))
    pad = torch.zeros_like(x, dtype=torch.bool)
    pad[:4, -5:] = True
    with torch.no_grad():
        model.train()
        seq = token_loss(model, x, pad, False)[0]
    loss = trainer.step(x, pad, 0)
    keep = seq < torch.quantile(seq, 0.5)
    assert 0 < int(keep.sum()) < 8
    torch.testing.assert_close(loss, (seq * keep).sum() / 8)


# --- example-tied dropout -------------------------------------------------------------------------


def _capture(model, reg):
    """(raw, after) block inputs: hooks registered before and after the regularizer's."""
    from tinymem_fast.tinymem.regularizers.example_tied_dropout import blocks_of

    seen = {"raw": [], "after": []}
    hs = []
    for b in blocks_of(model):
        hs.append(b.register_forward_pre_hook(lambda m, a, k: seen["raw"].append(a[0].detach().clone()),
                                              with_kwargs=True, prepend=True))
        hs.append(b.register_forward_pre_hook(lambda m, a, k: seen["after"].append(a[0].detach().clone()),
                                              with_kwargs=True))
    return seen, hs


def _zero_sets(model, reg, ids, train=True):
    seen, hs = _capture(model, reg)
    x = torch.randint(0, tsu.V, (len(ids), 10), generator=torch.Generator().manual_seed(len(ids)))
    model.train(train)
    reg.set_ids(torch.tensor(ids))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_example_tied_dropout_masks(arch):
    model = tsu.tiny(arch)
    reg = ExampleTiedDropout(model, p_fixed=0.2, p_mem=0.5, seed=0)
    n_fixed = math.floor(0.2 * 48)
    seen = _zero_sets(model, reg, [3, 11, 3, 700])
    masks = []
    for raw, after in zip(seen["raw"], seen["after"], strict=True):
        assert (raw != 0).all()
        kept = after != 0
        # over channels: one pattern for every position of a sequence; kept channels pass unscaled
        assert (kept == kept[:, :1]).all()
        torch.testing.assert_close(after[kept], raw[kept])
        assert kept[:, :, :n_fixed].all()          # the generalization channels are always on
        masks.append(kept[:, 0])
    for m in masks:
        assert torch.equal(m[0], m[2])              # duplicate copies share their sequence's mask
        assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[3])   # per example
    assert not torch.equal(masks[0], masks[1])      # each block has its own masks
    # stable: the same ids, in another batch and another call, in another order
    again = _zero_sets(model, reg, [700, 3])
    for m, after in zip(masks, again["after"], strict=True):
        kept = after[:, 0] != 0
        assert torch.equal(kept[0], m[3]) and torch.equal(kept[1], m[0])
    # a fresh instance with the same seed gives the same masks (nothing cached), another seed others
    reg.close()
    same, other = ExampleTiedDropout(model, 0.2, 0.5, seed=0), ExampleTiedDropout(model, 0.2, 0.5, seed=1)
    ids = torch.arange(50)
    assert torch.equal(same.masks(ids, 0), reg.masks(ids, 0))
    assert not torch.equal(other.masks(ids, 0), reg.masks(ids, 0))
    same.close()
    other.close()


def test_example_tied_dropout_on_fraction():
    model = tsu.tiny("gpt2")
    reg = ExampleTiedDropout(model, p_fixed=0.25, p_mem=0.1, seed=0)
    m = reg.masks(torch.arange(20000), 1)
    assert m[:, :12].all()
    frac = m[:, 12:].float().mean().item()
    assert abs(frac - 0.1) < 0.005
    per_channel = m[:, 12:].float().mean(0)
    assert (per_channel - 0.1).abs().max() < 0.02
    reg.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_example_tied_dropout_eval_rescales_fixed_channels(arch):
    model = tsu.tiny(arch)
    reg = ExampleTiedDropout(model, p_fixed=0.2, p_mem=0.1, seed=0)
    seen = _zero_sets(model, reg, [0, 1], train=False)
    n_fixed = math.floor(0.2 * 48)
    for raw, after in zip(seen["raw"], seen["after"], strict=True):
        torch.testing.assert_close(after[..., :n_fixed], raw[..., :n_fixed] * 1.5)
        assert (after[..., n_fixed:] == 0).all()
    reg.close()
    with torch.no_grad():     # detached: the model is plain again
        x = torch.randint(0, tsu.V, (2, 6))
        fresh = tsu.tiny(arch).eval()
        torch.testing.assert_close(model.eval()(x).logits, fresh(x).logits)


def test_example_tied_dropout_ids_and_errors():
    model = tsu.tiny("gpt2")
    reg = ExampleTiedDropout(model, 0.2, 0.1)
    model.train()
    with pytest.raises(RuntimeError, match="example ids"):
        model(torch.zeros(2, 4, dtype=torch.long))
    reg.set_ids(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="3 example ids for a batch of 2"):
        model(torch.zeros(2, 4, dtype=torch.long))
    reg.begin_step(0, torch.tensor([5, 5]), torch.tensor([8, 9]))
    assert reg.ids.tolist() == [5, 5]
    reg.close()
    per_row = ExampleTiedDropout(model, 0.2, 0.1, per_row_ids=True)
    per_row.begin_step(0, torch.tensor([5, 5]), torch.tensor([8, 9]))
    assert per_row.ids.tolist() == [8, 9]
    per_row.close()
    with pytest.raises(ValueError, match="no always-on channel"):
        ExampleTiedDropout(model, 0.01, 0.1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["spectral_norm", "example_tied_dropout"])
def test_regularized_step_runs_on_hf_families(arch, name):
    model = tsu.tiny(arch)
    cfg = TrainConfig(batch_size=4)
    hook = get_regularizer(name)(model, None, 0)
    trainer = Trainer(model, cfg, [hook])
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, tsu.V, (4, 12))
    loss = trainer.step(x, torch.zeros_like(x, dtype=torch.bool), 0, torch.arange(4), torch.arange(4))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    hook.close()


# --- exact resume ---------------------------------------------------------------------------------


TINY_DATA = dict(kind="math", artifact="noise", num_main=300, num_extra=80, num_test=40, seq_numbers=8,
                 max_ctx=48, prompt_len=8, mem_len=8, num_noise=20, dup_groups=2, dup_base=5)
TINY_MODEL = dict(n_layer=2, d_model=32, n_head=2, d_mlp=64)


@pytest.fixture(scope="module")
def tiny_data():
    return build(DataConfig(**TINY_DATA), seed=0)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_resume_with_regularizer_is_exact(tmp_path, tiny_data, name):
    def run(out, steps):
        cfg = TrainConfig(batch_size=16, max_steps=steps, ckpt_every=6, eval_every=100, eval_batch_size=128)
        reg = RegularizerConfig(name=name, timing_steps=0)
        reg.loss_truncation.trunc_buffer = reg.loss_truncation.trunc_min_count = 40
        reg.spectral_norm.spectral_lambda = 0.5
        model = build_model_for(tiny_data, ModelConfig(**TINY_MODEL), seed=0)
        train(model, tiny_data, cfg, str(out), seed=0, progress=False, regularizer=reg)
        return model

    ref = run(tmp_path / "ref", 12)
    run(tmp_path / "cut", 6)
    resumed = run(tmp_path / "cut", 12)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-000000006" / "trainer_state.pt",
                       weights_only=True)["hooks"]
    assert len(state) == 1
    if name == "loss_truncation":
        assert state[0]["seen"] == 96 and state[0]["threshold"] is not None
    if name == "spectral_norm":
        assert len(state[0]["u"]) == 2


# --- command line ---------------------------------------------------------------------------------


SETS = [f"data.{k}={v}" for k, v in TINY_DATA.items() if k not in ("kind", "artifact")] + \
       [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + \
       ["train.batch_size=32", "train.max_steps=12", "train.eval_batch_size=128",
        "regularizer.loss_truncation.trunc_buffer=64", "regularizer.loss_truncation.trunc_min_count=64"]


def _train(out, *extra):
    """`tinymem train` through the CLI's own parser and handler (in-process: no interpreter start-up)."""
    from tinymem_fast.cli import main

    sets = [a for s in SETS for a in ("--set", s)]
    return main(["train", "--preset", "quick", "--quiet", "--out", str(out), *sets, *extra])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "base"
    assert _train(out) == 0
    return out


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_cli_trains_with_regularizer_and_writes_row(baseline, tmp_path, name):
    res = tmp_path / "res"
    assert _train(tmp_path / name, "--regularizer", name, "--baseline", str(baseline),
                  "--results", str(res)) == 0
    final = json.loads((tmp_path / name / "final_metrics.json").read_text())
    cost = final["regularizer_cost"]
    assert cost["regularizer"] == name and cost["step_ms_plain"] > 0 and cost["overhead_ratio"] > 0
    info = json.loads((tmp_path / name / "run.json").read_text())
    assert info["config"]["regularizer"]["name"] == name and "regularizer" not in info["config"]["train"]
    (row,) = [json.loads(x) for x in (res / "results.jsonl").read_text().splitlines()]
    base = json.loads((baseline / "final_metrics.json").read_text())
    assert row["method"] == name and row["category"] == "regularizer" and row["time_method_s"] > 0
    assert row["mem_before"] == base["mem"] and row["mem_after"] == final["mem"]
    assert row["method_info"]["baseline"] == str(baseline) and "overhead_ratio" in row["method_info"]
    assert set(row["hparams"]) >= set(REGULARIZERS[name][1])
    assert (res / "results.csv").read_text().splitlines()[1].split(",")[2] == name


def test_cli_regularizer_bad_input(tmp_path, capsys):
    from tinymem_fast.cli import main

    assert main(["train", "--regularizer", "spectral_norm", "--results", "x", "--out", str(tmp_path)]) == 2
    assert "--baseline" in capsys.readouterr().err
    # and once through the installed entry point, as a user runs it
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", "train", "--regularizer", "dropconnect",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "unknown regularizer" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("sets,msg", [
    (["regularizer.name=etd", "regularizer.example_tied_dropout.etd_p_fixed=0"], "out of range"),
    (["regularizer.name=spectral_norm", "regularizer.spectral_norm.spectral_power=3"], "out of range"),
    (["regularizer.loss_truncation.trunc_drop_frac=1"], "out of range"),
    (["regularizer.timing_steps=-1"], "timing_steps"),
    (["regularizer.name=dropconnect"], "unknown regularizer"),
])
def test_regularizer_settings_are_checked_early(sets, msg):
    from tinymem_fast.tinymem.presets import apply_overrides, get_preset

    with pytest.raises(ValueError, match=msg):
        apply_overrides(get_preset("quick"), sets)
    cfg = apply_overrides(get_preset("quick"), ["regularizer.name=spectral_reg"])
    assert cfg.regularizer.name == "spectral_norm"         # reference names accepted


def test_regularizer_settings_left_train_but_old_spellings_still_read(tmp_path):
    """Settings that used to be TrainConfig fields: gone from it, yet a run.json or --set written with
    the old keys lands in the regularizer section (and resumes as the same configuration)."""
    import dataclasses

    from tinymem_fast.tinymem.presets import apply_overrides, from_dict, get_preset
    from tinymem_fast.tinymem.regularizers import MOVED
    from tinymem_fast.tinymem.training import _claim_run_folder

    assert not {f.name for f in dataclasses.fields(TrainConfig)} & {k.split(".")[1] for k in MOVED}
    cfg = apply_overrides(get_preset("quick"), ["train.regularizer=truncate_loss",
                                                "train.trunc_drop_frac=0.2", "train.reg_timing_steps=0"])
    assert (cfg.regularizer.name, cfg.regularizer.loss_truncation.trunc_drop_frac,
            cfg.regularizer.timing_steps) == ("loss_truncation", 0.2, 0)
    new = cfg.to_dict()
    old = {**new, "train": {**new["train"], "regularizer": "loss_truncation", "reg_timing_steps": 0,
                            **{f: v for r in SETTINGS_NAMES for f, v in new["regularizer"][r].items()}}}
    del old["regularizer"]
    assert from_dict(old).to_dict() == new
    (tmp_path / "final").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"config": old}))
    assert _claim_run_folder(str(tmp_path), new, resume=True) is not None   # same run: resumable
    changed = {**new, "regularizer": {**new["regularizer"], "name": "spectral_norm"}}
    with pytest.raises(ValueError, match="another configuration"):
        _claim_run_folder(str(tmp_path), changed, resume=True)
