"""The demo model itself: its configuration (Qwen2-MoE, fine-grained experts), the seeded random init
the training starts from, and loading a trained checkpoint. Shared by `train.py` (which trains it) and
`report.py` (which evaluates it), so neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"

#: the shipped demo config (Qwen2-MoE, fine-grained: 32 routed experts of width 128, top-4, one shared
#: expert of width 128; every layer is MoE; tied embeddings keep the file small). Every expert matrix
#: is 128 wide in both dimensions, so g128 groups divide every row, as in real MoEs (W3.25 = 3-bit g128).
DEFAULT_CONFIG: dict = dict(
    vocab_size=2048,  # with 128-wide experts the 16-bit file must stay <= 20 MB: a small vocab pays for the wider experts
    hidden_size=128,
    intermediate_size=256,  # dense-MLP width, unused (decoder_sparse_step=1: every layer is MoE)
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,  # a multiple of 128, like real MoEs: with g128 a 64-wide down_proj would pay a whole group of metadata per 64 weights (3-bit = 3.5 bpw) and break the W3.25 budgets
    shared_expert_intermediate_size=128,  # multiple of 128 (g128-aligned); 256 would push the file past 20 MB
    decoder_sparse_step=1,
    norm_topk_prob=False,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    output_router_logits=True,
    router_aux_loss_coef=0.01,
)

def build_config(vocab_size: int, overrides: dict | None = None):
    from transformers import Qwen2MoeConfig

    params = {**DEFAULT_CONFIG, "vocab_size": vocab_size, **(overrides or {})}
    config = Qwen2MoeConfig(**params)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # set from the tokenizer
    return config


def init_model(config, seed: int):
    """Random-init model of `config` (the same weights for the same seed: the 'untrained' baseline)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_checkpoint(ckpt_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer
