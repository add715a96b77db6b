"""Loading a model and its tokenizer from `demo`, `tiny:<arch>`, a local directory, or a hub name.

Weights load through transformers' safetensors path; `trust_remote_code` stays off unless asked.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .adapter import ARCHS, MoEAdapter

# Small but structurally faithful configs: a dense first layer where the family has one, shared
# experts where it has them, fused routed experts everywhere.
_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=260,
               max_position_embeddings=512, num_experts_per_tok=2)
TINY_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(_COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=8, num_hidden_layers=3),
    "qwen3_moe": dict(_COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_hidden_layers=3,
                      head_dim=16),
    "mixtral": dict(_COMMON, intermediate_size=32, num_local_experts=8, num_hidden_layers=3),
    "olmoe": dict(_COMMON, intermediate_size=32, num_experts=8, num_hidden_layers=3),
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                        n_routed_experts=8, n_shared_experts=1, num_hidden_layers=3, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                        n_group=1, topk_group=1),
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                        n_routed_experts=8, n_shared_experts=1, num_hidden_layers=3, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                        n_group=1, topk_group=1),
}


class ModelLoadError(RuntimeError):
    pass


def byte_tokenizer():
    """A 256-byte tokenizer (+ specials) built in code: no download, works on any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in ("<unk>", "<s>", "</s>", "<pad>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_CONFIGS:
        raise ModelLoadError(f"no tiny config for {arch!r}; available: {', '.join(sorted(TINY_CONFIGS))}")
    cfg = AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = 258, 257, 259
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # HF's init (std 0.02) gives near-identical experts; widen it so experts differ like trained ones.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16") from None


def check_weight_files(directory: str | Path) -> None:
    """Every safetensors file of a model directory must have a readable header that covers the file
    exactly (a truncated or garbled download is named here, not in a traceback from deep inside
    transformers)."""
    from safetensors import safe_open

    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelLoadError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:100]}): it is "
                                 "truncated or damaged; download or copy it again") from None


def _cast_as_loaded(model, dtype: torch.dtype):
    """`model.to(dtype)` as `from_pretrained(dtype=...)` leaves it: non-persistent float buffers (rotary
    `inv_freq`) stay float32, so a tiny model in bf16 computes what its saved checkpoint computes when loaded."""
    keep = {n: b for n, b in model.named_buffers() if b.is_floating_point()
            and n.rsplit(".", 1)[-1] in model.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set}
    model = model.to(dtype)
    for n, b in keep.items():
        mod, _, attr = n.rpartition(".")
        setattr(model.get_submodule(mod), attr, b)
    return model


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str = "cpu", trust_remote_code: bool = False,
               seed: int = 0, allow_packed: bool = False):
    """Returns (model, tokenizer, adapter). `spec`: "demo", "tiny:<arch>", a local path, or a hub name.

    A moebits packed checkpoint (an already quantized model) loads only with `allow_packed` (for
    evaluation and inspection); its experts stay packed, so the adapter is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..packed import is_packed

    torch_dtype = resolve_dtype(dtype, device)
    if spec.startswith("tiny:"):
        model, tok = _cast_as_loaded(tiny_model(spec.split(":", 1)[1], seed=seed), torch_dtype), byte_tokenizer()
        return model.to(device), tok, MoEAdapter(model)
    if spec == "demo":
        from ..demo import CHECKPOINT_DIR

        if not (Path(CHECKPOINT_DIR) / "config.json").exists():
            raise ModelLoadError(f"the demo checkpoint is missing from {CHECKPOINT_DIR}; regenerate it with "
                                 "`moebits train-demo --out <dir>` and copy it there")
        path = str(CHECKPOINT_DIR)
    else:
        path = spec
        p = Path(spec).expanduser()
        if p.exists():
            if not (p / "config.json").exists():
                raise ModelLoadError(f"{p} exists but holds no config.json: not a Hugging Face model directory")
            path = str(p)
            check_weight_files(p)
            if is_packed(p):
                if not allow_packed:
                    raise ModelLoadError(f"{p} is a moebits packed (already quantized) checkpoint: evaluate it "
                                         "(`moebits eval --model`) or inspect it (`moebits info --model`); "
                                         "quantize the original model instead")
                from ..packed import load_quantized

                model = load_quantized(p, dtype=resolve_dtype(dtype, device), device=device)
                return model, AutoTokenizer.from_pretrained(str(p)), None
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ModelLoadError(f"model path not found: {spec}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0]
        raise ModelLoadError(
            f"could not load {spec!r}: {msg}. Give a local Hugging Face directory, `demo`, `tiny:<arch>` "
            f"({', '.join(sorted(ARCHS))}), or a hub name on a machine with internet access.") from None
    model = model.to(device).eval()
    return model, tok, MoEAdapter(model)
