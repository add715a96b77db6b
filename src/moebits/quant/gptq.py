"""GPTQ (Frantar et al., 2023): quantize columns one at a time and push each column's rounding error
onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs, H = X^T X / n.

Batched over a leading dimension: `w [B, out, in]` with `hessian [B, in, in]` quantizes B experts
in one pass (the per-column loop then runs once for all of them). Group parameters are taken from
the error-updated weights when a group starts (as in the reference); with `act_order` the columns
are visited in order of decreasing Hessian diagonal and the groups' parameters are fixed up front
from the original weights ("static groups"), so the stored layout stays plain g128.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .qweight import QuantizedWeight
from .rtn import QmaxBits, group_view, minmax_params, round_codes


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """`x [n, in]` (or `[B, n, in]`) -> `X^T X / n` in float32."""
    x = x.float()
    return x.transpose(-1, -2) @ x / max(1, x.shape[-2])


@dataclass
class PreparedHessian:
    """What GPTQ derives from a Hessian alone, independent of the weight and the bit-width: the upper
    Cholesky factor of the damped inverse, the dead inputs, and with act_order the column order. The
    profiler prepares each expert's Hessian once and quantizes every block that reads it (gate and up
    share one) at every bit-width with it; `quantize_gptq` prepares and runs in one call."""
    hinv: torch.Tensor  # [B, K, K] upper Cholesky factor of (H + damp)^-1, permuted with act_order
    dead: torch.Tensor  # [B, K] bool: inputs that were always zero (their weights are zeroed)
    perm: torch.Tensor | None = None  # [B, K] column order (decreasing H_ii) with act_order

    def __getitem__(self, index) -> "PreparedHessian":
        """The batch elements `index` (a list or LongTensor of element indices)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return PreparedHessian(self.hinv[index], self.dead[index], None if self.perm is None else self.perm[index])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hinv, self.dead, self.perm) if t is not None)

    @staticmethod
    def cat(parts: list["PreparedHessian"]) -> "PreparedHessian":
        perms = [p.perm for p in parts]
        return PreparedHessian(torch.cat([p.hinv for p in parts]), torch.cat([p.dead for p in parts]),
                               None if perms[0] is None else torch.cat(perms))


@torch.no_grad()
def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """`hessian [K, K]` or `[B, K, K]` -> `PreparedHessian` (batched)."""
    H = (hessian[None] if hessian.dim() == 2 else hessian).float().clone()  # [B, K, K]
    K = H.shape[-1]
    eye = torch.eye(K, dtype=H.dtype)
    diag = torch.diagonal(H, dim1=1, dim2=2)  # [B, K]
    dead = diag == 0  # inputs that were always zero: their weights do not matter
    H = H + torch.diag_embed(dead.float())
    perm = None
    if act_order:
        B = H.shape[0]
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=1, descending=True)  # [B, K]
        H = H.gather(1, perm[:, :, None].expand(B, K, K)).gather(2, perm[:, None, :].expand(B, K, K))
    mean_diag = torch.diagonal(H, dim1=1, dim2=2).mean(dim=1)  # [B]
    H = H + damp * mean_diag[:, None, None] * eye
    L = torch.linalg.cholesky(H)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky of H^-1
    return PreparedHessian(hinv, dead, perm)


@torch.no_grad()
def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    """Dequantized GPTQ weight, same shape and dtype as `w` (`[out, in]` or `[B, out, in]`); or, with
    `return_codes`, what is stored (codes, scale and integer zero per group)."""
    squeeze = w.dim() == 2
    W = w[None] if squeeze else w
    H = hessian[None] if hessian.dim() == 2 else hessian
    B, R, K = W.shape
    if H.shape != (B, K, K):
        raise ValueError(f"hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    out = quantize_gptq_prepared(W, prepare_hessian(H, damp, act_order), bits, group_size, return_codes)
    return out[0] if squeeze else out


@torch.no_grad()
def quantize_gptq_prepared(w: torch.Tensor, prepared: PreparedHessian, bits: int | torch.Tensor,
                           group_size: int = 128, return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    """GPTQ of `w [B, R, K]` with prepared Hessians (`prepare_hessian`, one per batch element). `bits`:
    an int, or a `[B, R]` tensor giving each row its own bit-width (rows never interact in GPTQ, so a
    row's result is the same as in a call at its width alone; `return_codes` needs an int)."""
    W = w.float().clone()  # [B, R, K]
    B, R, K = W.shape
    Hinv, dead, perm = prepared.hinv, prepared.dead, prepared.perm
    act_order = perm is not None
    if Hinv.shape != (B, K, K):
        raise ValueError(f"prepared hessian shape {tuple(Hinv.shape)} does not match weight {tuple(W.shape)}")
    per_row = torch.is_tensor(bits)
    if per_row:
        if return_codes:
            raise ValueError("return_codes needs one bit-width for the whole batch")
        bits = bits.to(torch.float32).expand(B, R)
    g = K if group_size <= 0 else group_size
    W = W.masked_fill(dead[:, None, :], 0.0)

    G = -(-K // g)
    group_scale = torch.zeros(B, R, G)  # what is stored: one scale and zero per (row, group)
    group_zero = torch.zeros(B, R, G)
    if act_order or group_size <= 0:
        # act_order: fix the (unpermuted) groups' parameters first ("static groups"), then visit
        # columns by decreasing H_ii. Per-channel: one set of parameters from the whole row, as the
        # reference does (not one per 128-column block, which would be g128 storage).
        group_scale, group_zero = minmax_params(group_view(W, g), bits[..., None] if per_row else bits)  # [B, R, G]
    if act_order:
        W = W.gather(2, perm[:, None, :].expand(B, R, K))

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    block = g if group_size > 0 else 128
    qmax_bits = QmaxBits(bits) if per_row else bits  # 2^bits - 1 once, not per column
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        # the block column-major, [n, B, R]: column i and the columns after it are contiguous, so the
        # per-column update streams them once (the same elementwise arithmetic: 2-3x faster than [B, R, n])
        W1 = W[:, :, i1:i2].permute(2, 0, 1).contiguous()
        H1 = Hinv[:, i1:i2, i1:i2].permute(1, 2, 0).contiguous()  # [n, n, B]
        Q1, C1, Err1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
        if group_size <= 0 and not act_order:
            scale, zero = group_scale[..., 0], group_zero[..., 0]
        elif not act_order:
            # i1 is a group start (block == group size): parameters from the error-updated weights
            scale, zero = minmax_params(W[:, :, i1:i2], bits)  # [B, R]
            group_scale[:, :, i1 // g], group_zero[:, :, i1 // g] = scale, zero
        for i in range(i2 - i1):
            col = W1[i]  # [B, R]
            if act_order:
                gi = (perm[:, i1 + i] // g)[:, None, None].expand(B, R, 1)
                scale, zero = group_scale.gather(2, gi)[..., 0], group_zero.gather(2, gi)[..., 0]
            c = round_codes(col, scale, zero, qmax_bits)
            q = (c - zero) * scale
            C1[i], Q1[i] = c, q
            err = (col - q) / H1[i, i][:, None]
            W1[i:] -= H1[i, i:][:, :, None] * err[None]
            Err1[i] = err
        Q[:, :, i1:i2], codes[:, :, i1:i2] = Q1.permute(1, 2, 0), C1.permute(1, 2, 0)
        W[:, :, i2:] -= Err1.permute(1, 2, 0).contiguous() @ Hinv[:, i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm, dim=1)[:, None, :].expand(B, R, K)
        Q, codes = Q.gather(2, inv), codes.gather(2, inv)
    if return_codes:
        return QuantizedWeight(bits, group_size, codes.to(torch.uint8), group_scale.half(), group_zero.half())
    return Q.to(w.dtype)
