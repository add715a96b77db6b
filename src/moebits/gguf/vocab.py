"""The tokenizer as llama.cpp's converter writes it for a byte-level BPE (`_set_vocab_gpt2`).

Tokens, token types (NORMAL / CONTROL for special added tokens / USER_DEFINED / UNUSED padding up to the
model's vocab size) and merges, plus the special token ids and add-bos/eos flags that the `gguf` package's
`SpecialVocab` reads from tokenizer.json / tokenizer_config.json / config.json, exactly as the converter.

`tokenizer.ggml.pre` names the pre-tokenizer (the regex that splits text before BPE). The converter finds
it by hashing the token ids of a fixed test string (`get_vocab_base_pre`); the hashes of the tokenizers of
the families moebits exports are copied below from it. A tokenizer trained by the user (the demo's) has no
known hash: its tokenizer.json is read instead, and a plain byte-level pre-tokenizer with GPT-2's regex
(`ByteLevel(use_regex=true)`, no `Split`) is llama.cpp's `gpt-2`. Anything else is refused by name.
SentencePiece vocabularies (Mixtral's original tokenizer) are not written yet.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

# convert_hf_to_gguf.py's get_vocab_base_pre: its test string and the hashes of the families' tokenizers
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 '
          '33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_PRE = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # deepseek-ai/DeepSeek-V3
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # allenai/OLMo-1.7-7B-hf
}


class UnsupportedTokenizer(ValueError):
    pass


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; moebits writes "
                                   "byte-level BPE vocabularies to GGUF")
    return json.loads(backend.to_str())


def _is_gpt2_byte_level(pre: dict | None) -> bool:
    if pre is None:
        return False
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
        return len(items) == 1 and _is_gpt2_byte_level(items[0])
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in KNOWN_PRE:
        return KNOWN_PRE[chkhsh]
    tj = _tokenizer_json(tokenizer)
    if _is_gpt2_byte_level(tj.get("pre_tokenizer")):
        return "gpt-2"
    raise UnsupportedTokenizer(
        f"cannot tell which llama.cpp pre-tokenizer this tokenizer uses (test-string hash {chkhsh[:16]}... is not one "
        f"of the known {sorted(set(KNOWN_PRE.values()))}, and its pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:160]} "
        "is not GPT-2's plain byte-level one); convert it with llama.cpp's convert_hf_to_gguf.py")


def _looks_special(tok: str) -> bool:
    """The converter's `does_token_look_special`: added tokens some models forget to mark special."""
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def add_vocab(writer, tokenizer, model_dir: str | Path | None, vocab_size: int) -> dict:
    """Write the tokenizer into `writer` (a gguf.GGUFWriter) as the converter does; returns a summary."""
    import gguf

    tj = _tokenizer_json(tokenizer)
    if tj.get("model", {}).get("type") != "BPE" or tj["model"].get("byte_fallback"):
        kind = tj.get("model", {}).get("type")
        raise UnsupportedTokenizer(f"the tokenizer is a {kind}{' with byte fallback (SentencePiece-style)' if kind == 'BPE' else ''} "
                                   "model; moebits writes byte-level BPE (GPT-2 style) vocabularies to GGUF")
    pre = pre_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedTokenizer(f"the tokenizer has ids up to {max(vocab.values())}, the model's vocab is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or _looks_special(tok)
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    if model_dir:
        special = gguf.SpecialVocab(model_dir, load_merges=True)
    else:  # a tokenizer built in code (tiny:<arch>): read its files as transformers saves them
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            special = gguf.SpecialVocab(d, load_merges=True)
    if not special.merges:
        merges = tj["model"].get("merges") or []
        special.merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not special.merges:
        # llama.cpp requires a merges array for BPE and the gguf writer cannot write an empty one: a merge
        # of two special tokens (never adjacent symbols of pre-tokenized text) changes no tokenization.
        specials = [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL][:2]
        if len(specials) < 2:
            raise UnsupportedTokenizer("the BPE tokenizer has no merges and too few special tokens to stand in")
        special.merges = [" ".join(specials)]
    for typ, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                      ("pad", "pad_token_id")):
        tid = getattr(tokenizer, attr, None)
        if typ not in special.special_token_ids and isinstance(tid, int) and 0 <= tid < vocab_size:
            special.special_token_ids[typ] = tid
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges)}
