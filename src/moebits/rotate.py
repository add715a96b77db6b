"""Random Hadamard rotation of a MoE model that leaves its function unchanged (QuaRot-style; GPTQ* when a
quantizer then runs on the rotated weights).

Residual stream (fused into the weights, nothing at run time). With the residual `h` rotated to `h Q`
(`Q` orthogonal, row vectors), an RMSNorm's `h / rms(h)` commutes with `Q` once its weight `g` is folded
into the linears that read it (`W -> W diag(g)`, norm weight -> 1). Then every reader of the normed
residual takes `W -> W Q` (attention q/k/v or MLA's q_a/q and kv_a_proj_with_mqa, the router, routed and
shared gate/up, Qwen2-MoE's shared-expert gate, a dense layer's gate/up, lm_head via the final norm),
every writer into it `W -> Q^T W`, bias `b -> Q^T b` (o_proj, routed/shared/dense down), and the
embedding rows `E -> E Q`. Router logits are unchanged because the router is a linear reader like the
others. MLA's q_a/kv_a layernorms and Qwen3/OLMoE's q/k norms act inside attention and stay as they are.
Tied embeddings are untied (the lm_head gets `diag(g) Q`, the embedding `Q`).

`Q = D H / sqrt(n)` with `D` a seeded random +-1 diagonal and `H` a Hadamard matrix: Sylvester's for
powers of two, otherwise a Kronecker product of a Paley matrix (orders q+1, q prime = 3 mod 4, and
2(q+1), q prime = 1 mod 4: 12, 20, 24, 28, 36, 44, ...) with a Sylvester one; other sizes are refused.

Online down projection (`hadamard`, not `hadamard-offline`): the expert's intermediate `act(gate) * up`
is rotated at run time by `H_I / sqrt(I)` (deterministic; rebuilt from its size alone) and `W_down ->
W_down H_I^T / sqrt(I)`. Seeded signs `D_I` are folded into the up rows and the down columns first, so
the online operator needs no seed. It runs as the "rotate" stage of the down block's input transforms (models/transforms.py;
before activation quantization), in the fused experts forward, the shared experts' down_proj pre-hook
and `PackedExperts`; the packed format records
it in `quantization_config["rotation"]` and rebuilds it at load.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .models.adapter import MoEAdapter, UnsupportedModelError
from .models.transforms import clear_transforms, experts_chain, set_expert_transform, set_linear_transform

STAGE = "rotate"  # the input-transform stage (models/transforms.py) online rotations use, before act_quant

ROTATIONS = ("hadamard", "hadamard-offline")
ATTENTION_READERS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")


# ---- Hadamard matrices ----------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """`[q, q]` Q_ij = chi(j - i), chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def paley_hadamard(order: int) -> np.ndarray | None:
    """A Hadamard matrix of `order` by Paley's constructions (I: q+1 with q prime = 3 mod 4; II: 2(q+1)
    with q prime = 1 mod 4), or None when neither applies."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        S = np.zeros((order, order), dtype=np.int64)
        S[0, 1:], S[1:, 0] = 1, -1
        S[1:, 1:] = _jacobsthal(q)
        return S + np.eye(order, dtype=np.int64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        C = np.zeros((q + 1, q + 1), dtype=np.int64)
        C[0, 1:] = C[1:, 0] = 1
        C[1:, 1:] = _jacobsthal(q)
        return np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64),
                                                                 np.array([[1, -1], [-1, -1]]))
    return None


def hadamard_split(n: int) -> tuple[int, int]:
    """`(a, p)` with `n = a * p`, p a power of two (Sylvester) and a = 1 or a Paley order; ValueError else."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of size {n}")
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    if odd == 1:
        return 1, n
    for j in range(twos + 1):
        a = odd << j
        if paley_hadamard(a) is not None:
            return a, n // a
    raise ValueError(f"no Hadamard matrix of size {n} is built here: supported sizes are 2^k times 1 or a Paley order "
                     f"(q+1 for a prime q = 3 mod 4, 2(q+1) for a prime q = 1 mod 4; e.g. 12, 20, 28, 44, 1408 = 44*32,"
                     f" 14336 = 28*512); {n} = {odd} * 2^{twos}. Rotate a model whose hidden and expert sizes are such,"
                     " or quantize without --rotate")


_PALEY_CACHE: dict[int, torch.Tensor] = {}


def _paley_tensor(a: int) -> torch.Tensor:
    if a not in _PALEY_CACHE:
        H = paley_hadamard(a)
        if not np.array_equal(H @ H.T, a * np.eye(a, dtype=np.int64)):  # guards the construction itself
            raise AssertionError(f"Paley construction of order {a} is not Hadamard")
        _PALEY_CACHE[a] = torch.from_numpy(H).to(torch.float64)
    return _PALEY_CACHE[a]


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) of the last dim (a power of two)."""
    shape, n, h = x.shape, x.shape[-1], 1
    while h < n:
        y = x.reshape(*shape[:-1], n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """`x @ M^T` over the last dim n (`x @ M` with `transpose`), M = (H_a kron H_p) / sqrt(n) orthogonal,
    in O(n log n + n a) per row. The same function rotates weights and, online, activations."""
    n = x.shape[-1]
    a, p = hadamard_split(n)
    y = _fwht(x.reshape(*x.shape[:-1], a, p))
    if a > 1:
        Ha = _paley_tensor(a).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("ij,...jk->...ik", Ha.T if transpose else Ha, y)
    return y.reshape(x.shape) / math.sqrt(n)


def random_signs(n: int, seed: int, salt: int) -> torch.Tensor:
    """Seeded +-1 `[n]` float64 (`salt` tells the uses of one seed apart)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """`Q = D M^T` `[n, n]` float64, orthogonal: the residual rotation `h -> h Q`."""
    return hadamard_transform(torch.diag(random_signs(n, seed, 0)))


class OnlineHadamard:
    """Unit input transform `x -> x M^T` (M the size-n normalized Hadamard), computed in float32 or wider."""

    row_wise = True  # models/transforms.py: each row is rotated on its own

    def __init__(self, n: int):
        hadamard_split(n)  # refuse unsupported sizes when built, not in the forward
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"online Hadamard of size {self.n} got inputs of width {x.shape[-1]}")
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return hadamard_transform(wide).to(x.dtype)

    def __repr__(self) -> str:
        return f"OnlineHadamard({self.n})"


# ---- the model ---------------------------------------------------------------------------------------
@dataclass
class Rotation:
    """What `rotate_model` did, enough to rebuild its run-time part: recorded in run results and packed configs."""
    method: str
    seed: int
    hidden: int
    online_down: dict[str, int] = field(default_factory=dict)  # "routed"/"shared" -> online Hadamard size
    untied_embeddings: bool = False
    check_max_abs_diff: float | None = None  # logits after vs before on a fixed probe, and their scale
    check_logit_scale: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rotation":
        return cls(**d)


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise UnsupportedModelError(f"{type(norm).__name__} has no epsilon attribute; cannot check it is an RMSNorm")


@torch.no_grad()
def check_rmsnorm(norm: nn.Module, name: str) -> torch.Tensor:
    """The norm's weight `[H]`, after checking that it computes `x / sqrt(mean(x^2) + eps) * weight`
    (a LayerNorm's mean subtraction or a Gemma-style `1 + weight` would not commute with a rotation)."""
    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise UnsupportedModelError(f"{name} ({type(norm).__name__}) is not a weight-only RMSNorm; rotation folds only those")
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(w.device, w.dtype)
    xf = x.double()
    ref = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(norm)) * w.double()
    out = norm(x).double()
    if not torch.allclose(out, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item()):
        raise UnsupportedModelError(f"{name} ({type(norm).__name__}) does not compute x / rms(x) * weight; "
                                    "rotation cannot fold it")
    return w.detach().double()


def _fold_read(weight: torch.Tensor, g: torch.Tensor | None, Q: torch.Tensor) -> None:
    """A reader `[..., out, H]`: `W -> W diag(g) Q`, in place."""
    w = weight.data.double()
    if g is not None:
        w = w * g.to(w.device)
    weight.data.copy_((w @ Q.to(w.device)).to(weight.dtype))


def _rotate_write(weight: torch.Tensor, Q: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """A writer `[..., H, in]`: `W -> Q^T W` (and `b -> Q^T b`), in place."""
    Qd = Q.to(weight.device)
    weight.data.copy_((Qd.T @ weight.data.double()).to(weight.dtype))
    if bias is not None:
        bias.data.copy_((bias.data.double() @ Qd).to(bias.dtype))


def _linear(module: nn.Module, name: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}, not nn.Linear; cannot rotate it")
    return module


def _untie(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


def _probe_logits(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    dev = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return model(input_ids=ids.to(dev), use_cache=False).logits.double()


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: MoEAdapter, method: str = "hadamard", seed: int = 0,
                 check: bool = True) -> Rotation:
    """Rotate `model` in place (see the module docstring). With `check`, compare its logits on a fixed
    16-token probe before and after and refuse (in fp32/fp64) a change beyond rounding."""
    if method not in ROTATIONS:
        raise ValueError(f"unknown rotation {method!r}; choose one of {ROTATIONS}")
    if getattr(model, "_moebits_rotation", None) is not None:
        raise ValueError("this model is already rotated")
    before = _probe_logits(model) if check else None
    H = adapter.hidden
    Q = random_hadamard(H, seed)
    untied = _untie(model)
    core = model.model
    norms = []
    for i, layer in enumerate(adapter.decoder_layers):
        pre = f"model.layers.{i}"
        g1 = check_rmsnorm(layer.input_layernorm, f"{pre}.input_layernorm")
        attn = layer.self_attn
        readers = [n for n in ATTENTION_READERS if getattr(attn, n, None) is not None]
        if not readers:
            raise UnsupportedModelError(f"{pre}.self_attn has none of {ATTENTION_READERS}; unknown attention layout")
        for n in readers:
            _fold_read(_linear(getattr(attn, n), f"{pre}.self_attn.{n}").weight, g1, Q)
        o = _linear(attn.o_proj, f"{pre}.self_attn.o_proj")
        _rotate_write(o.weight, Q, o.bias)
        g2 = check_rmsnorm(layer.post_attention_layernorm, f"{pre}.post_attention_layernorm")
        mlp = layer.mlp
        if i in adapter.moe_layers:
            router = mlp.gate
            if getattr(router, "weight", None) is None or tuple(router.weight.shape) != (adapter.num_experts, H):
                raise UnsupportedModelError(f"{pre}.mlp.gate: expected a router weight [{adapter.num_experts}, {H}]")
            _fold_read(router.weight, g2, Q)
            ex = adapter.experts(i)
            _fold_read(ex.gate_up_proj, g2, Q)
            _rotate_write(ex.down_proj, Q)
            shared = adapter.shared_mlp(i)
            if shared is not None:
                for k in ("gate", "up"):
                    _fold_read(_linear(getattr(shared, f"{k}_proj"), f"{pre}.mlp.shared.{k}_proj").weight, g2, Q)
                d = _linear(shared.down_proj, f"{pre}.mlp.shared.down_proj")
                _rotate_write(d.weight, Q, d.bias)
            sg = adapter.shared_gate(i)
            if sg is not None:
                _fold_read(_linear(sg, f"{pre}.mlp.shared_expert_gate").weight, g2, Q)
        else:  # a dense MLP (DeepSeek's first_k_dense_replace layers)
            for k in ("gate", "up"):
                _fold_read(_linear(getattr(mlp, f"{k}_proj"), f"{pre}.mlp.{k}_proj").weight, g2, Q)
            d = _linear(mlp.down_proj, f"{pre}.mlp.down_proj")
            _rotate_write(d.weight, Q, d.bias)
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    gf = check_rmsnorm(core.norm, "model.norm")
    head = model.get_output_embeddings()
    _fold_read(_linear(head, "lm_head").weight, gf, Q)
    norms.append(core.norm)
    emb = model.get_input_embeddings().weight
    emb.data.copy_((emb.data.double() @ Q.to(emb.device)).to(emb.dtype))
    for n in norms:
        n.weight.data.fill_(1.0)

    rot = Rotation(method, int(seed), H, untied_embeddings=untied)
    if method == "hadamard":
        rot.online_down = rotate_down_inputs(adapter, seed)
    if check:
        after = _probe_logits(model)
        rot.check_max_abs_diff = float((after - before).abs().max())
        rot.check_logit_scale = float(before.abs().max())
        full = next(model.parameters()).dtype in (torch.float32, torch.float64)
        if full and rot.check_max_abs_diff > 1e-3 * max(rot.check_logit_scale, 1.0):
            raise RuntimeError(f"rotation changed the model's logits by {rot.check_max_abs_diff:.3g} (scale "
                               f"{rot.check_logit_scale:.3g}): some module reads the residual stream that "
                               "rotate.py does not know; please report the architecture")
    object.__setattr__(model, "_moebits_rotation", rot)
    return rot


def online_hadamard_of(module: nn.Module, expert: int | None = None, kind: str | None = "down") -> OnlineHadamard | None:
    """The online Hadamard installed at the "rotate" stage of a fused experts module's `(expert, kind)`
    block (or of a linear: `expert=None, kind=None`), if any."""
    chain = experts_chain(module)
    if chain is None:
        return None
    fn = chain.chains.get((expert, kind), {}).get(STAGE) or chain.chains.get((None, kind), {}).get(STAGE)
    return fn if isinstance(fn, OnlineHadamard) else None


@torch.no_grad()
def rotate_down_inputs(adapter: MoEAdapter, seed: int) -> dict[str, int]:
    """Fold seeded signs into up rows / down columns, rotate down's input side by the Hadamard and install
    the online Hadamard (stage "rotate") on every routed and shared down projection. Returns the sizes."""
    sizes = {}
    for layer in adapter.moe_layers:
        ex, inter = adapter.experts(layer), adapter.intermediate
        d = random_signs(inter, seed, 1 + layer).to(ex.gate_up_proj.device)
        up = ex.gate_up_proj.data[:, inter:]
        up.copy_((up.double() * d[:, None]).to(up.dtype))
        ex.down_proj.data.copy_(hadamard_transform(ex.down_proj.data.double() * d).to(ex.down_proj.dtype))
        set_expert_transform(ex, None, "down", STAGE, OnlineHadamard(inter))
        sizes["routed"] = inter
        shared = adapter.shared_mlp(layer)
        if shared is not None:
            n = shared.down_proj.in_features
            ds = random_signs(n, seed, 100_003 + layer).to(shared.down_proj.weight.device)
            w_up = shared.up_proj.weight
            w_up.data.copy_((w_up.data.double() * ds[:, None]).to(w_up.dtype))
            if shared.up_proj.bias is not None:
                shared.up_proj.bias.data.mul_(ds.to(shared.up_proj.bias.dtype))
            w_dn = shared.down_proj.weight
            w_dn.data.copy_(hadamard_transform(w_dn.data.double() * ds).to(w_dn.dtype))
            set_linear_transform(shared.down_proj, STAGE, OnlineHadamard(n))
            sizes["shared"] = n
    return sizes


def install_online(rotation: dict | Rotation | None, modules) -> int:
    """Install the online Hadamards a rotation recorded on loaded modules: `modules` yields
    `(module, kind)` pairs, kind "experts" (a fused or packed experts module) or "down" (a shared down
    linear, dense or packed). Returns how many modules got one."""
    if rotation is None:
        return 0
    rot = rotation if isinstance(rotation, Rotation) else Rotation.from_dict(rotation)
    if rot.method not in ROTATIONS:
        raise ValueError(f"checkpoint records rotation {rot.method!r}, unknown to this moebits ({ROTATIONS})")
    if not rot.online_down:
        return 0
    count = 0
    for mod, kind in modules:
        if kind == "experts":
            n = mod.intermediate if hasattr(mod, "intermediate") else mod.down_proj.shape[-1]
            if n != rot.online_down.get("routed"):
                raise ValueError(f"recorded online Hadamard size {rot.online_down.get('routed')} != expert width {n}")
            set_expert_transform(mod, None, "down", STAGE, OnlineHadamard(n))
        else:
            n = mod.in_features
            if n != rot.online_down.get("shared"):
                raise ValueError(f"recorded online Hadamard size {rot.online_down.get('shared')} != shared width {n}")
            set_linear_transform(mod, STAGE, OnlineHadamard(n))
        count += 1
    return count


@torch.no_grad()
def fold_online(adapter: MoEAdapter) -> int:
    """Undo the run-time half in the weights: `W_down -> W_down M` for every down projection with an online
    Hadamard, and remove it (for dense 16-bit saves/exports: same function, the codes' grid is not kept)."""
    count = 0
    for layer in adapter.moe_layers:
        ex = adapter.experts(layer)
        if any(online_hadamard_of(ex, e) is not None for e in range(adapter.num_experts)):
            for e in range(adapter.num_experts):
                if online_hadamard_of(ex, e) is None:
                    raise ValueError(f"layer {layer}: expert {e} has no online Hadamard while others do")
            ex.down_proj.data.copy_(hadamard_transform(ex.down_proj.data.double(), transpose=True)
                                    .to(ex.down_proj.dtype))
            clear_transforms(ex, STAGE)
            count += adapter.num_experts
        shared = adapter.shared_mlp(layer)
        if shared is not None and online_hadamard_of(shared.down_proj, None, None) is not None:
            w = shared.down_proj.weight
            w.data.copy_(hadamard_transform(w.data.double(), transpose=True).to(w.dtype))
            clear_transforms(shared.down_proj, STAGE)
            count += 1
    return count


def incoherence(w: torch.Tensor) -> torch.Tensor:
    """max|w| / rms(w) per matrix over the last two dims (`[..., out, in]` -> `[...]`): what rotation lowers."""
    w = w.double()
    return w.abs().amax(dim=(-2, -1)) / w.pow(2).mean(dim=(-2, -1)).sqrt()
