"""Low-rank compensators (BT-MoE, after MiLo): W ~ Q(W - UV) + UV with `U [out, r]`, `V [r, in]`.

For a weight `W` and a choice (bits, rank r) the fit alternates two steps, each optimal for its own
variable with the other fixed:

    Q_0 = Q(W)                      quantize the weight itself
    U, V = SVD_r(W - Q_t)           best rank-r fit of the current quantization residual (Eckart-Young)
    Q_{t+1} = Q(W - UV)             re-quantize what the compensator does not explain

and stops when the relative residual ||W - Q - UV||_F / ||W||_F stops improving (by more than `rtol`,
1 % by default), or after `max_iters` (5). On the demo model's experts the first alternation gains 2-5 %
of the residual and later ones under 1 % each, so this keeps the fit to 2-4 quantizer calls. The quantizer step is not a Frobenius-optimal projection (HQQ minimises an l_p<1 loss,
GPTQ an output error, RTN rounds to nearest), so an iteration may make things worse: every matrix keeps
its best iterate, hence the returned residual never exceeds that of plain quantize-then-SVD (iteration
0). The factors are rounded through fp16 before they are scored, exactly as they are stored.

Works on `[out, in]` or a batch `[B, out, in]` (all experts of a layer at once): one batched SVD and
one batched quantizer call per iteration; each matrix stops improving on its own and records the
number of iterations it used. Supported quantizers: any callable `quantize(target)` returning the
dequantized tensor or a `QuantizedWeight` (then the fit also returns what is stored: Q's codes, scales
and zeros with the factors, `fit.stored`); `quant.quantize_weight` wires HQQ (the paper's), RTN and
GPTQ (with the unit's Hessian; the SVD step stays unweighted, i.e. fits the weight residual, not the
output residual).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .qweight import QuantizedWeight

FACTOR_DTYPE = torch.float16  # how U and V are stored (Choice.storage_bits counts 16 bits per entry)


class RankTooLargeError(ValueError):
    pass


@dataclass
class LowRankFit:
    weight: torch.Tensor  # [..., out, in] the dequantized weight Q + U V, in the input's dtype
    quantized: torch.Tensor  # [..., out, in] Q, the dequantized quantized part alone
    U: torch.Tensor  # [..., out, r] left factor (FACTOR_DTYPE, as stored)
    V: torch.Tensor  # [..., r, in] right factor (FACTOR_DTYPE, as stored)
    iterations: torch.Tensor  # [...] int: alternations that improved the residual (0 = quantize-then-SVD)
    residual: torch.Tensor  # [...] relative residual ||W - Q - UV||_F / ||W||_F of the returned fit
    history: list[torch.Tensor]  # per iteration, [...] relative residual of that iterate (accepted or not)
    stored: QuantizedWeight | None = None  # Q's codes/scale/zero with u = U, v = V (when the quantizer gives codes)


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    if rank < 0:
        raise RankTooLargeError(f"compensator rank must be >= 0, got {rank}")
    if rank > min(out_features, in_features):
        raise RankTooLargeError(
            f"compensator rank {rank} exceeds the smaller side of a [{out_features} x {in_features}] weight "
            f"(at most {min(out_features, in_features)}); choose ranks <= {min(out_features, in_features)} "
            "(--ranks / --attn-rank)")


def truncated_svd(residual: torch.Tensor, rank: int, factor_dtype: torch.dtype | None = FACTOR_DTYPE):
    """Best rank-`rank` factors of `residual [..., out, in]`: `U [..., out, r]`, `V [..., r, in]`, the
    singular values split evenly (sqrt on each side) so neither factor overflows fp16 first."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = s[..., :rank].sqrt()
    U = u[..., :, :rank] * root[..., None, :]
    V = root[..., :, None] * vh[..., :rank, :]
    if factor_dtype is not None:
        U, V = U.to(factor_dtype), V.to(factor_dtype)
    return U, V


def _dequantized(q) -> torch.Tensor:
    return q.dequantize(torch.float32) if isinstance(q, QuantizedWeight) else q.float()


def _pick(better: torch.Tensor, new, old):
    """Per matrix of the batch: `new` where `better`, else `old` (tensors or QuantizedWeights)."""
    if not isinstance(new, QuantizedWeight):
        return torch.where(better[..., None, None], new, old)
    m = better[..., None, None]
    return QuantizedWeight(new.bits, new.group_size, torch.where(m, new.codes, old.codes),
                           torch.where(m, new.scale, old.scale), torch.where(m, new.zero, old.zero))


def _relative(w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w).clamp(min=1e-30)


@torch.no_grad()
def fit_lowrank(w: torch.Tensor, rank: int, quantize: Callable[[torch.Tensor], torch.Tensor], max_iters: int = 5,
                rtol: float = 1e-2, factor_dtype: torch.dtype | None = FACTOR_DTYPE) -> LowRankFit:
    """Fit `Q + UV` to `w` by alternating quantization and truncated SVD (see the module doc).

    `quantize(target [..., out, in]) -> dequantized` is the choice's quantizer; `max_iters` bounds the
    alternations after the first quantize-then-SVD; an iterate is accepted for a matrix when it lowers
    that matrix's relative residual by more than `rtol` (relative), and the loop ends when none does.
    `factor_dtype=None` keeps float32 factors (only for checking the algebra).
    """
    out_features, in_features = w.shape[-2:]
    check_rank(rank, out_features, in_features)
    W = w.float()
    q = quantize(W)  # what is stored for Q (codes) or its dequantized tensor
    Q = _dequantized(q)
    if rank == 0:
        U = torch.zeros(*W.shape[:-1], 0, dtype=factor_dtype or torch.float32)
        V = torch.zeros(*W.shape[:-2], 0, in_features, dtype=factor_dtype or torch.float32)
        res = _relative(W, Q)
        return LowRankFit(Q.to(w.dtype), Q.to(w.dtype), U, V, torch.zeros_like(res, dtype=torch.long), res, [res],
                          q if isinstance(q, QuantizedWeight) else None)
    U, V = truncated_svd(W - Q, rank, factor_dtype)
    best = _relative(W, Q + U.float() @ V.float())
    history = [best]
    iterations = torch.zeros_like(best, dtype=torch.long)
    for it in range(1, max_iters + 1):
        q_new = quantize(W - U.float() @ V.float())
        Q_new = _dequantized(q_new)
        U_new, V_new = truncated_svd(W - Q_new, rank, factor_dtype)
        err = _relative(W, Q_new + U_new.float() @ V_new.float())
        history.append(err)
        better = err < best * (1 - rtol)  # [...]
        if not bool(better.any()):
            break
        Q = torch.where(better[..., None, None], Q_new, Q)
        q = _pick(better, q_new, q)
        U = torch.where(better[..., None, None], U_new, U)
        V = torch.where(better[..., None, None], V_new, V)
        best = torch.where(better, err, best)
        iterations = torch.where(better, torch.full_like(iterations, it), iterations)
    deq = Q + U.float() @ V.float()  # as QuantizedWeight.dequantize computes it
    stored = None
    if isinstance(q, QuantizedWeight):
        stored = QuantizedWeight(q.bits, q.group_size, q.codes, q.scale, q.zero, u=U.to(FACTOR_DTYPE),
                                 v=V.to(FACTOR_DTYPE))
    return LowRankFit(deq.to(w.dtype), Q.to(w.dtype), U, V, iterations, best, history, stored)
