"""The importance matrix llama.cpp quantizes with, computed as `llama-imatrix` computes it, in its file format.

What `llama-imatrix` collects (tools/imatrix/imatrix.cpp, `collect_imatrix`): for every matrix
multiplication with a `blk.*` weight, per input column the sum of the squared activations over the rows
(tokens) that reach it, and the number of those rows; for a fused expert tensor (MUL_MAT_ID) one such row
of sums and one count per expert, over the tokens routed to that expert. `llama-quantize` divides sums by
counts (an expert never reached gets 1.0 everywhere) and hands each expert's row to `ggml_quantize_chunk`.
The output matrix is left out unless `--process-output`, embeddings (a row lookup) always.

moebits runs the model over its calibration windows with read-only hooks: every `nn.Linear` inside the
decoder layers (attention, shared experts, dense MLPs) by a forward pre-hook, the routed experts through
`MoEAdapter.capture_routing` (the tokens routed to each expert, and the down projection's inputs from
`expert_intermediate`). For the routed experts these are exactly the diagonals of the calibration's GPTQ
Hessians times the routed-token counts (`X^T X`); a test holds them equal.

File format (what current llama-quantize reads, common/imatrix-loader.cpp): a GGUF with
`general.type = "imatrix"`, `imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size` (u32),
and per weight `<name>.in_sum2` F32 [n_mat, cols] and `<name>.counts` F32 [n_mat, 1], sorted by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

GENERAL_TYPE = "imatrix"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Imatrix:
    """Per GGUF weight name: `sums [n_mat, cols]` of squared input activations and `counts [n_mat]` of the
    rows (tokens) summed (n_mat = experts of a fused expert tensor, else 1)."""
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    chunk_count: int = 0  # calibration windows
    chunk_size: int = 0  # tokens per window
    datasets: list[str] = field(default_factory=list)

    def add(self, name: str, mat: int, n_mat: int, sum_sq: np.ndarray, rows: int) -> None:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, sum_sq.shape[-1]), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        self.sums[name][mat] += sum_sq
        self.counts[name][mat] += rows

    def names(self) -> list[str]:
        return sorted(self.sums)

    def mean(self, name: str) -> np.ndarray:
        """float32 [n_mat, cols]: what llama-quantize quantizes `name` with, computed as it computes it from
        the file (float32 sums / float32 counts; 1.0 for a matrix no token reached), so that the values are
        bit-identical whether they come from memory or from the saved file."""
        s, c = self.sums[name].astype(np.float32), self.counts[name].astype(np.float32)
        out = np.ones_like(s, dtype=np.float32)
        hit = c > 0
        out[hit] = s[hit] / c[hit, None]
        return out

    def for_tensor(self, name: str) -> np.ndarray | None:
        """The per-column importance of `name` as `moebits.gguf.ggml.quantize` takes it ([cols] for a
        2-D weight, [experts, cols] for a fused expert tensor), or None when the file has no entry."""
        if name not in self.sums:
            return None
        m = self.mean(name)
        return m[0] if m.shape[0] == 1 else m

    # -- file io --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write llama.cpp's GGUF imatrix file (atomically)."""
        import gguf

        from ..atomic import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch=GENERAL_TYPE, endianess=gguf.GGUFEndian.LITTLE)
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
            w.add_type(GENERAL_TYPE)
            w.add_array(KEY_DATASETS, list(self.datasets) or ["moebits calibration"])
            w.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
            w.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
            for name in self.names():
                w.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32))
                w.add_tensor(f"{name}.counts", self.counts[name].astype(np.float32).reshape(-1, 1))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Imatrix":
        """Read a GGUF imatrix (as written by `save` or by `llama-imatrix`)."""
        import gguf

        r = gguf.GGUFReader(str(path))
        if (f := r.get_field(gguf.Keys.General.TYPE)) is None or f.contents() != GENERAL_TYPE:
            raise ValueError(f"{path} is not a GGUF importance matrix (general.type != 'imatrix'); legacy .dat "
                             "files are read by llama-quantize but not by moebits")
        out = cls(datasets=list(r.get_field(KEY_DATASETS).contents()) if r.get_field(KEY_DATASETS) else [],
                  chunk_count=int(r.get_field(KEY_CHUNK_COUNT).contents()) if r.get_field(KEY_CHUNK_COUNT) else 0,
                  chunk_size=int(r.get_field(KEY_CHUNK_SIZE).contents()) if r.get_field(KEY_CHUNK_SIZE) else 0)
        tensors = {t.name: np.array(t.data, dtype=np.float32) for t in r.tensors}
        for key, arr in tensors.items():
            if key.endswith(".in_sum2"):
                name = key.removesuffix(".in_sum2")
                counts = tensors.get(name + ".counts")
                if counts is None:
                    raise ValueError(f"{path}: {name} has sums and no counts")
                n_mat = counts.size
                out.sums[name] = arr.reshape(n_mat, -1).astype(np.float64)
                out.counts[name] = np.rint(counts.reshape(-1)).astype(np.int64)
        return out


def _linear_targets(gm, model) -> dict[str, tuple[nn.Linear, str]]:
    """HF module name -> (module, GGUF weight name) for every nn.Linear inside a decoder layer."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            gname = gm.linear_tensor(name)
            if gname is not None:
                out[name] = (mod, gname)
    return out


@torch.no_grad()
def collect_imatrix(model, windows: torch.Tensor, batch_size: int = 8, adapter=None, progress: bool = False,
                    dataset: str = "moebits calibration") -> Imatrix:
    """The importance matrix of `model` over `windows [n, T]` (token ids), as llama-imatrix computes it:
    keyed by GGUF tensor names (`blk.3.attn_q.weight`, `blk.3.ffn_down_exps.weight` with one row per expert)."""
    from tqdm.auto import tqdm

    from ..models.adapter import MoEAdapter
    from .convert import EXPERT_ROLES, GGUFModel

    gm = GGUFModel(model)
    adapter = adapter or MoEAdapter(model)
    im = Imatrix(chunk_count=int(windows.shape[0]), chunk_size=int(windows.shape[1]), datasets=[dataset])
    targets = _linear_targets(gm, model)
    names = {"gate": {}, "up": {}, "down": {}}
    for layer in adapter.moe_layers:
        for kind in names:
            names[kind][layer] = f"blk.{layer}.{EXPERT_ROLES[kind]}.weight"

    def add_rows(name: str, mat: int, n_mat: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0]:  # a batch's sums in float32 (llama-imatrix accumulates in float), the running sum in float64
            im.add(name, mat, n_mat, x.square().sum(0).cpu().numpy(), x.shape[0])

    def on_linear(module_name: str, x: torch.Tensor) -> None:
        add_rows(targets[module_name][1], 0, 1, x)

    E = adapter.num_experts

    def on_routed(b) -> None:
        x = b.hidden.float()
        flat = b.top_k_index.reshape(-1)
        tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(b.top_k_index.shape[1])
        keep = flat < E  # (padding slots of some routers point past the last expert)
        flat, tok = flat[keep], tok[keep]
        # gate/up: every expert's sums in one scatter; counts = routed tokens per expert
        sq = torch.zeros(E, x.shape[1], device=x.device).index_add_(0, flat, x.square()[tok]).double().cpu().numpy()
        n = torch.bincount(flat, minlength=E).cpu().numpy()
        for kind in ("gate", "up"):
            for e in np.flatnonzero(n):
                im.add(names[kind][b.layer], int(e), E, sq[e], int(n[e]))
        for e in np.flatnonzero(n).tolist():  # down: the intermediate of each expert's own tokens
            add_rows(names["down"][b.layer], e, E, adapter.expert_intermediate(b.layer, e, x[tok[flat == e]]))

    model.eval()
    device = next(model.parameters()).device
    modules = {n: m for n, (m, _) in targets.items()}
    with adapter.capture_linear_inputs(modules, on_linear), adapter.capture_routing(on_routed):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="imatrix", disable=not progress, leave=False):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    # every expert gets its row, reached or not (llama-imatrix writes partial entries the same way)
    for layer in adapter.moe_layers:
        for kind in names:
            n = names[kind][layer]
            if n not in im.sums:
                cols = adapter.intermediate if kind == "down" else adapter.hidden
                im.sums[n], im.counts[n] = np.zeros((E, cols)), np.zeros(E, dtype=np.int64)
    return im
