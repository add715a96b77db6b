"""A model opened lazily: its structure on the meta device, one decoder layer materialised at a time.

`LazyModel` builds the causal LM from its config with every parameter on the meta device (buffers,
e.g. rotary frequencies, stay real: they are computed, not loaded), materialises the parts outside
the decoder layers (embeddings, final norm, lm_head) on `device`, and loads exactly one decoder layer's
tensors when asked (`with lazy.layer(i): ...`), putting them back on meta afterwards. The `MoEAdapter`
of `lazy.model` works throughout: it only reads the layers it is asked about.

Tensors come from a `TensorSource`:

* `SafetensorsSource` -- a Hugging Face checkpoint directory (one `model.safetensors` or shards with
  `model.safetensors.index.json`); each tensor is read alone with `safe_open`. Checkpoints keep the
  experts one by one (`experts.{e}.gate_proj.weight`, or Mixtral's `block_sparse_moe.experts.{e}.w1`),
  while transformers 5 fuses them (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`);
  the source resolves a model tensor to the checkpoint tensors it is made of.
* `ModelSource` -- the state dict of a model already in memory (`tiny:<arch>`), so that the streaming
  path runs on the same interface in tests.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .adapter import MoEAdapter

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# per-expert checkpoint names of the fused expert tensors: (gate, up) rows of gate_up_proj, down_proj
_GATE_NAMES, _UP_NAMES, _DOWN_NAMES = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


class LazyLoadError(ValueError):
    pass


def layer_of(name: str) -> int | None:
    """Decoder layer index of a state-dict name, None outside the layers."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


class SafetensorsSource:
    """The tensors of a checkpoint directory, read one by one, never all at once."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise LazyLoadError(f"{self.directory}: no config.json; not a Hugging Face model directory")
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.weight_map = {k: self.directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / SINGLE_NAME).is_file():
            with safe_open(str(self.directory / SINGLE_NAME), "pt") as f:
                self.weight_map = {k: self.directory / SINGLE_NAME for k in f.keys()}
        else:
            raise LazyLoadError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}; streaming reads safetensors "
                                "checkpoints only")
        self._handles: dict[Path, object] = {}

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def file_bytes(self) -> int:
        """Bytes of the checkpoint's weight files on disk (what loading it whole would take, in its dtype)."""
        return sum(f.stat().st_size for f in self.files)

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.directory))

    def _raw(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.weight_map[key]
        if path not in self._handles:  # one open handle per shard file (mmap; reading a tensor copies only it)
            self._handles[path] = safe_open(str(path), "pt")
        return self._handles[path].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def _aliases(self, name: str) -> list[str]:
        return [name, name.replace(".mlp.", ".block_sparse_moe.")]

    def get(self, name: str, shape: tuple | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model tensor `name` (fused experts assembled from their per-expert checkpoint tensors,
        directly in `dtype`: no stacked copy in the checkpoint's dtype on the way)."""
        for alias in self._aliases(name):
            if alias in self.weight_map:
                return self._raw(alias)
        fused = self._fused(name, shape, dtype)
        if fused is not None:
            return fused
        raise LazyLoadError(f"{self.directory}: tensor {name} is not in the checkpoint (nor per expert)")

    def _fused(self, name: str, shape: tuple | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        base, _, attr = name.rpartition(".")
        if attr not in ("gate_up_proj", "down_proj") or shape is None:
            return None
        for prefix in self._aliases(base):
            def find(e, names):
                for n in names:
                    key = f"{prefix}.{e}.{n}.weight"
                    if key in self.weight_map:
                        return key
                return None
            n_experts = shape[0]
            if attr == "gate_up_proj":
                keys = [(find(e, _GATE_NAMES), find(e, _UP_NAMES)) for e in range(n_experts)]
                parts = [[g, u] for g, u in keys] if all(g and u for g, u in keys) else None
            else:
                keys = [find(e, _DOWN_NAMES) for e in range(n_experts)]
                parts = [[k] for k in keys] if all(keys) else None
            if parts is None:
                continue
            first = self._raw(parts[0][0])
            out = torch.empty(shape, dtype=dtype or first.dtype)
            for e, names in enumerate(parts):  # expert by expert into the fused tensor (rows: gate then up)
                row = 0
                for key in names:
                    t = self._raw(key)
                    out[e, row:row + t.shape[0]].copy_(t)
                    row += t.shape[0]
            return out
        return None

    def has(self, name: str) -> bool:
        return any(a in self.weight_map for a in self._aliases(name))


class ModelSource:
    """The tensors of a model already in memory (its state dict, names as the model has them)."""

    def __init__(self, model: nn.Module):
        self._config = model.config
        self.state = model.state_dict()

    def config(self):
        return self._config

    def file_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.state.values():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    def get(self, name: str, shape: tuple | None = None) -> torch.Tensor:
        if name not in self.state:
            raise LazyLoadError(f"tensor {name} is not in the model's state dict")
        return self.state[name]

    def has(self, name: str) -> bool:
        return name in self.state

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _parameters_on_meta():
    """Register every new parameter on the meta device (buffers are left where they are created)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass
class Materialised:
    """What is on the device now: parameter tensors and their bytes (tied tensors counted once)."""
    tensors: int
    bytes: int


class LazyModel:
    def __init__(self, source, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        config = source.config()
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model.eval()
        for mod in self.model.modules():  # buffers (rotary frequencies) to the device; parameters stay meta
            for k, b in mod._buffers.items():
                if b is not None and not b.is_meta:
                    mod._buffers[k] = b.to(self.device)
        self.adapter = MoEAdapter(self.model)
        self.num_layers = len(self.adapter.decoder_layers)
        self.loaded: int | None = None
        self._meta_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters(remove_duplicate=False)}
        for name in self._persistent_buffers():  # small (e.g. routing biases): loaded once, all layers
            self._set(name, self.source.get(name), buffer=True)
        for name in self._param_names(None):
            self._load_param(name)
        self._tie()
        self.source.close()
        self.peak_materialised = self.materialised().bytes  # the most bytes of parameters ever on the device

    # ---- names ---------------------------------------------------------------------------
    def _param_names(self, layer: int | None) -> list[str]:
        """Parameter names (duplicates of tied ones left out) of decoder layer `layer`, or outside the layers."""
        return [n for n, _ in self.model.named_parameters() if layer_of(n) == layer]

    def _persistent_buffers(self) -> list[str]:
        sd_names = set(self.model.state_dict().keys())
        return [n for n, _ in self.model.named_buffers() if n in sd_names and self.source.has(n)]

    # ---- materialise / drop -----------------------------------------------------------------
    def _set(self, name: str, value: torch.Tensor, buffer: bool = False) -> None:
        prefix, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(prefix) if prefix else self.model
        if buffer:
            old = mod._buffers[attr]
            mod._buffers[attr] = value.to(self.device, old.dtype)
        else:
            mod._parameters[attr] = nn.Parameter(value, requires_grad=False)

    def _load_param(self, name: str) -> None:
        shape = self._meta_shapes[name]
        t = self.source.get(name, shape, self.dtype) if isinstance(self.source, SafetensorsSource) else \
            self.source.get(name, shape)
        if tuple(t.shape) != shape:
            raise LazyLoadError(f"tensor {name}: checkpoint shape {tuple(t.shape)} != model shape {shape}")
        t = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
        self._set(name, t)

    def _tie(self) -> None:
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tie = getattr(self.model.config, "tie_word_embeddings", False)
        if head is not None and (tie or head.weight.is_meta) and emb is not None:
            if head.weight.is_meta and not tie:
                raise LazyLoadError("the checkpoint has no lm_head weight and does not tie it to the embeddings")
            head.weight = emb.weight

    def load_layer(self, layer: int) -> None:
        """Materialise decoder layer `layer` (dropping the one loaded before)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if self.loaded == layer:
            return
        if self.loaded is not None:
            self.drop_layer()
        for name in self._param_names(layer):
            self._load_param(name)
        self.source.close()  # unmap the shards: mapped pages read so far would otherwise stay resident
        self.loaded = layer
        self.peak_materialised = max(self.peak_materialised, self.materialised().bytes)
        bad = [n for n, p in self.model.named_parameters() if layer_of(n) == layer and not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"weight {bad[0]} has NaN/inf value(s); refusing to quantize a broken checkpoint")

    def drop_layer(self) -> None:
        if self.loaded is None:
            return
        for name, p in list(self.model.named_parameters()):
            if layer_of(name) == self.loaded:
                self._set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        self.loaded = None

    @contextlib.contextmanager
    def layer(self, layer: int):
        """Layer `layer` materialised for the block; dropped after it unless it was loaded before (re-entrant)."""
        was_loaded = self.loaded == layer
        self.load_layer(layer)
        try:
            yield self.adapter.decoder_layers[layer]
        finally:
            if not was_loaded:
                self.drop_layer()

    def materialised(self) -> Materialised:
        ps = [p for p in self.model.parameters() if not p.is_meta]  # parameters() yields tied ones once
        return Materialised(len(ps), sum(p.numel() * p.element_size() for p in ps))

    def layer_bytes(self, layer: int) -> int:
        """Bytes decoder layer `layer` takes when materialised (in the model's dtype)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(p.numel() * size for n, p in self.model.named_parameters() if layer_of(n) == layer)


def open_source(spec: str, trust_remote_code: bool = False, seed: int = 0):
    """(source, tokenizer, in-memory model or None) for a model spec: a checkpoint directory, `demo`,
    `tiny:<arch>` (built in memory), or a hub name already in the Hugging Face cache."""
    from transformers import AutoTokenizer

    from .loading import ModelLoadError, byte_tokenizer, tiny_model

    if spec.startswith("tiny:"):
        model = tiny_model(spec.split(":", 1)[1], seed=seed)
        return ModelSource(model), byte_tokenizer(), model
    if spec == "demo":
        from ..demo import CHECKPOINT_DIR

        path = Path(CHECKPOINT_DIR)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
                raise ModelLoadError(f"model path not found: {spec}")
            path = _hub_snapshot(spec)
    try:
        source = SafetensorsSource(path)
    except LazyLoadError as e:
        raise ModelLoadError(str(e)) from None
    return source, AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code), None


def _hub_snapshot(name: str) -> Path:
    """The local snapshot of hub model `name` (config, safetensors, tokenizer), from the HF cache first."""
    from .loading import ModelLoadError

    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        try:
            return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: try the hub (fails cleanly offline)
            return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not resolve {name!r} as a local directory or a Hugging Face hub model "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
