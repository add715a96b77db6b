"""GPTQ (Frantar et al., 2023): quantize columns one at a time and push each column's rounding error
onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs, H = X^T X / n.

Batched over a leading dimension: `w [B, out, in]` with `hessian [B, in, in]` quantizes B experts
in one pass (the per-column loop then runs once for all of them). Group parameters are taken from
the error-updated weights when a group starts (as in the reference); with `act_order` the columns
are visited in order of decreasing Hessian diagonal and the groups' parameters are fixed up front
from the original weights ("static groups"), so the stored layout stays plain g128.
"""
from __future__ import annotations

import torch

from .qweight import QuantizedWeight
from .rtn import group_view, minmax_params, round_codes


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """`x [n, in]` (or `[B, n, in]`) -> `X^T X / n` in float32."""
    x = x.float()
    return x.transpose(-1, -2) @ x / max(1, x.shape[-2])


@torch.no_grad()
def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    """Dequantized GPTQ weight, same shape and dtype as `w` (`[out, in]` or `[B, out, in]`); or, with
    `return_codes`, what is stored (codes, scale and integer zero per group)."""
    squeeze = w.dim() == 2
    W = (w[None] if squeeze else w).float().clone()  # [B, R, K]
    H = (hessian[None] if hessian.dim() == 2 else hessian).float().clone()  # [B, K, K]
    B, R, K = W.shape
    if H.shape != (B, K, K):
        raise ValueError(f"hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    g = K if group_size <= 0 else group_size
    eye = torch.eye(K, dtype=H.dtype)

    diag = torch.diagonal(H, dim1=1, dim2=2)  # [B, K]
    dead = diag == 0  # inputs that were always zero: their weights do not matter
    H = H + torch.diag_embed(dead.float())
    W = W.masked_fill(dead[:, None, :], 0.0)

    G = -(-K // g)
    group_scale = torch.zeros(B, R, G)  # what is stored: one scale and zero per (row, group)
    group_zero = torch.zeros(B, R, G)
    if act_order or group_size <= 0:
        # act_order: fix the (unpermuted) groups' parameters first ("static groups"), then visit
        # columns by decreasing H_ii. Per-channel: one set of parameters from the whole row, as the
        # reference does (not one per 128-column block, which would be g128 storage).
        group_scale, group_zero = minmax_params(group_view(W, g), bits)  # [B, R, G]
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)  # [B, K]
        W = W.gather(2, perm[:, None, :].expand(B, R, K))
        H = H.gather(1, perm[:, :, None].expand(B, K, K)).gather(2, perm[:, None, :].expand(B, K, K))

    mean_diag = torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)  # [B]
    H = H + damp * mean_diag[:, None, None] * eye
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky of H^-1

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    block = g if group_size > 0 else 128
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        if group_size <= 0 and not act_order:
            scale, zero = group_scale[..., 0], group_zero[..., 0]
        elif not act_order:
            # i1 is a group start (block == group size): parameters from the error-updated weights
            scale, zero = minmax_params(W1, bits)  # [B, R]
            group_scale[:, :, i1 // g], group_zero[:, :, i1 // g] = scale, zero
        for i in range(i2 - i1):
            col = W1[:, :, i]  # [B, R]
            if act_order:
                gi = (perm[:, i1 + i] // g)[:, None, None].expand(B, R, 1)
                scale, zero = group_scale.gather(2, gi)[..., 0], group_zero.gather(2, gi)[..., 0]
            c = round_codes(col, scale, zero, bits)
            q = (c - zero) * scale
            codes[:, :, i1 + i] = c
            Q[:, :, i1 + i] = q
            err = (col - q) / Hinv1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm, dim=1)[:, None, :].expand(B, R, K)
        Q, codes = Q.gather(2, inv), codes.gather(2, inv)
    if return_codes:
        qw = QuantizedWeight(bits, group_size, codes.to(torch.uint8), group_scale.half(), group_zero.half())
        return qw[0] if squeeze else qw
    Q = Q.to(w.dtype)
    return Q[0] if squeeze else Q
