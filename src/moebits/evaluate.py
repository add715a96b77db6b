"""Perplexity, GPTQ convention: tokenize the whole evaluation text once, cut it into
non-overlapping windows of `seqlen` tokens (the ragged tail is dropped), PPL = exp(mean token NLL)
over every predicted token of every window.

Which text is evaluated is the caller's: the `ppl` of `moebits quantize` (``ppl_fp`` / ``ppl_q``) is this
function on ``moebits.data.load_text(--eval)``. For WikiText-2 that is GPTQ's text, the one the papers
quote: a ``wiki.test.raw`` file (or ``hf:wikitext:wikitext-2-raw-v1``) becomes the data set's rows joined
with ``"\n\n"`` (``moebits.data.wikitext_gptq_text``: 1,294,336 characters, not the file's 1,288,556);
``rawfile:PATH`` tokenizes a file verbatim, which gives a different number. ``moebits eval --tasks
wikitext2`` is the same measure; ``--tasks wikitext`` is lm-eval's document-level one instead."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (windows * (seqlen - 1))
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, "seqlen": self.seqlen}


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int, batch_size: int = 8, max_windows: int | None = None,
               progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """`token_ids`: 1-D LongTensor of the whole tokenized evaluation text."""
    token_ids = token_ids.reshape(-1)
    n_windows = token_ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}; "
                         "use a longer text or a smaller --seqlen")
    windows = token_ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    mean = nll_sum / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=n_windows, seqlen=seqlen)
