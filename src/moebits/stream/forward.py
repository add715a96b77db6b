"""Running a model one decoder layer at a time on carried hidden states.

`layer_call_kwargs` runs the model's own forward with every decoder layer replaced by a recorder, so
the embeddings, the causal masks (per layer type) and the rotary embeddings are computed by the
model's code, exactly as in a whole-model forward; the forward stops before the final norm. Then
`run_layer` applies one materialised layer to the hidden states of every batch, with the kwargs that
layer would have received. Batching is the same as the whole-model forward's (`batch_size` windows
at a time), so each batch goes through the same kernels with the same shapes as in memory.

`HiddenStore` keeps the hidden states entering a layer on disk (one safetensors file per layer,
written atomically), so host memory does not grow with depth and a stopped run restarts from the
inputs of its first unfinished layer.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_path

_NOT_KWARGS = ("past_key_values", "past_key_value")


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _recording_layers(decoder_layers, record):
    """Every decoder layer's forward becomes `record(layer, args, kwargs)` + identity; after the last, stop."""
    last = len(decoder_layers) - 1
    for i, layer in enumerate(decoder_layers):
        def fake(*args, _i=i, **kwargs):
            record(_i, args, kwargs)
            if _i == last:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]
        layer.forward = fake  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in decoder_layers:
            del layer.forward


@torch.no_grad()
def layer_call_kwargs(model, decoder_layers, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """(hidden states entering layer 0 `[B, T, H]`, the kwargs of each decoder layer) for `input_ids [B, T]`."""
    first, kwargs_of = {}, [None] * len(decoder_layers)

    def record(i, args, kwargs):
        if i == 0:
            first["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        kw = {k: v for k, v in kwargs.items() if k not in _NOT_KWARGS and k != "hidden_states"}
        kwargs_of[i] = kw

    with _recording_layers(decoder_layers, record):
        try:
            model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
    return first["h"], kwargs_of


@torch.no_grad()
def run_layer(layer_module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer_module(hidden, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).detach()


class BatchedWindows:
    """Windows `[n, T]` cut into the batches every pass uses, with each batch's per-layer kwargs."""

    def __init__(self, lazy, windows: torch.Tensor, batch_size: int):
        self.windows, self.batch_size = windows, batch_size
        self.starts = list(range(0, windows.shape[0], batch_size))
        self.kwargs: list[list[dict]] = []
        self._embeds: list[torch.Tensor] = []
        device = lazy.device
        for s in self.starts:
            h, kw = layer_call_kwargs(lazy.model, lazy.adapter.decoder_layers, windows[s:s + batch_size].to(device))
            self._embeds.append(h.cpu())
            self.kwargs.append(kw)

    def embeddings(self) -> list[torch.Tensor]:
        """Hidden states entering layer 0, per batch (on the host)."""
        return self._embeds

    def __len__(self) -> int:
        return len(self.starts)


def forward_layer(lazy, layer: int, batches: BatchedWindows, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layer `layer` (materialised) on every batch's hidden states; outputs on the host."""
    mod = lazy.adapter.decoder_layers[layer]
    return [run_layer(mod, h.to(lazy.device), batches.kwargs[b][layer]).cpu() for b, h in enumerate(hidden)]


@torch.no_grad()
def batch_nll(lazy, hidden: list[torch.Tensor], batches: BatchedWindows) -> tuple[float, int]:
    """Sum of next-token NLL over every batch, from the last layer's outputs (final norm + lm_head), and
    the number of predicted tokens: what `evaluate.perplexity` sums, batch by batch."""
    model, nll_sum, count = lazy.model, 0.0, 0
    norm = model.model.norm
    for b, h in enumerate(hidden):
        ids = batches.windows[batches.starts[b]:batches.starts[b] + batches.batch_size].to(lazy.device)
        logits = model.lm_head(norm(h.to(lazy.device))).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
        nll_sum += nll.item()
        count += ids[:, 1:].numel()
    return nll_sum, count


class HiddenStore:
    """Hidden states entering each layer, one file per (stream, layer): `{name}.L{layer}.safetensors`."""

    def __init__(self, directory: str | Path, name: str):
        self.directory, self.name = Path(directory), name
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, layer: int) -> Path:
        return self.directory / f"{self.name}.L{layer}.safetensors"

    def has(self, layer: int) -> bool:
        return self.path(layer).exists()

    def save(self, layer: int, hidden: list[torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        with atomic_path(self.path(layer)) as tmp:
            save_file({f"b{i}": h.contiguous() for i, h in enumerate(hidden)}, str(tmp))
        return self.path(layer)

    def load(self, layer: int) -> list[torch.Tensor]:
        return load_hidden(self.path(layer))

    def drop(self, layer: int) -> None:
        self.path(layer).unlink(missing_ok=True)


def load_hidden(path: str | Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    d = load_file(str(path))
    return [d[f"b{i}"] for i in range(len(d))]
