"""The skinny GEMM's epilogue spec (`Epilogue`, see kernels/triton_gemv.py) and its torch
forms: the reference the Triton kernel is tested against, the dispatch's cuBLAS fallback,
and the helpers that produce or consume a normed input (hg, sq) outside a GEMV. No Triton
here: the model runner imports this on machines without it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_M = 16  # rows of x the Triton kernel takes; also the width of the sum-of-squares partials


@dataclass(frozen=True, eq=False)  # holds tensors: compare `kind`, never the tensors
class Epilogue:
    """What the GEMV does to x @ w.T before storing it (kernels/triton_gemv.py's docstring says why)."""
    rstd_sq: torch.Tensor | None = None  # [P, 16] fp32 row sums of squares from a producer
    eps: float = 1e-6  # the RMSNorm epsilon that goes with rstd_sq
    gated: bool = False
    residual: torch.Tensor | None = None  # [M, N]
    norm_weight: torch.Tensor | None = None  # [N], with residual

    @property
    def kind(self) -> tuple:
        return (self.rstd_sq is not None, self.gated, self.residual is not None)


PLAIN = Epilogue()


def gemv_reference(x, w, w2=None, epi: Epilogue = PLAIN):
    """The torch form (cuBLAS on CUDA; also the dispatch's fallback): same outputs as
    gemv_triton, the epilogue computed in fp32 on the rounded product."""
    if epi.kind == PLAIN.kind:
        y = F.linear(x, w)
        return torch.cat([y, F.linear(x, w2)], 1) if w2 is not None else y
    if epi.gated:
        y = F.linear(x, w).float()
        n = w.shape[0] // 2
        g, u = y[:, :n], y[:, n:]
    else:
        y = F.linear(x, w)
        y = (torch.cat([y, F.linear(x, w2)], 1) if w2 is not None else y).float()
    if epi.rstd_sq is not None:
        r = _rstd(epi.rstd_sq, x.shape[0], x.shape[1], epi.eps)
        y = y * r
        if epi.gated:
            g, u = g * r, u * r
    if epi.gated:
        y = F.silu(g) * u
    if epi.residual is None:
        return y.to(x.dtype)
    y = (y + epi.residual.float()).to(x.dtype)
    yf = y.float()
    hg = (yf * epi.norm_weight.float()).to(x.dtype)
    return y, hg, _row_sums(yf)


def norm_parts(x, norm_weight):
    """(x * norm_weight, sq) for an input no GEMV epilogue produced (the embeddings): what a
    consumer with Epilogue(rstd_sq=sq) needs to apply the RMSNorm."""
    xf = x.float()
    return (xf * norm_weight.float()).to(x.dtype), _row_sums(xf)


def _row_sums(yf):
    """[1, max(16, M)]: the row sums of squares as one partial, zero-padded to the Triton
    kernel's 16 rows (wider above 16 rows, where only the torch forms run)."""
    sq = torch.zeros(1, max(MAX_M, yf.shape[0]), dtype=torch.float32, device=yf.device)
    sq[0, :yf.shape[0]] = (yf * yf).sum(1)
    return sq


def rms_normalize(hg, sq, eps):
    """The normalized rows rmsnorm(y) from (hg, sq): for consumers that are not a GEMV."""
    return (hg.float() * _rstd(sq, hg.shape[0], hg.shape[1], eps)).to(hg.dtype)


def _rstd(sq, rows, width, eps):
    """[rows, 1] fp32: 1 / rms of each row from its sum-of-squares partials sq [P, >= rows]."""
    return torch.rsqrt(sq.sum(0)[:rows] / width + eps)[:, None]
