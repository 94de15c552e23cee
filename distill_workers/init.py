"""Data-driven initialisation of a fresh DSLA layer.

With no normaliser, a converted layer's output is orders of magnitude off the
teacher's (and the history state's grows with position), so starting gradient descent
from the default weights wastes most of the budget on finding the scale. Here the state
mix and the per-head output scales are solved directly on a few cached blocks: for each
candidate history weight w1, the output is linear in the nine per-head scales, so they
follow from one small least-squares problem; the w1 with the lowest residual wins.
"""
from __future__ import annotations

import math

import torch

from kernels import dsla_prefill

HISTORY_WEIGHTS = (0.5, 0.2, 0.05, 0.01, 0.002, 0.0005)


@torch.no_grad()
def _per_head_contributions(module, x, cos, sin, w):
    """[Hq, M] rows: what each head alone adds to the (flattened) layer output, scale 1."""
    q, k, v, g1, g2 = module.project(x, cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1))
    o, _, _ = dsla_prefill(q, k, v, g1, g2, w, scale=1.0 / math.sqrt(module.head_dim),
                           chunk_size=module.cfg.chunk_size)
    H, D = module.num_heads, module.head_dim
    W = module.teacher.o_proj.weight  # [hidden, H*D]
    rows = [(o[:, :, h, :] @ W[:, h * D:(h + 1) * D].T).reshape(-1) for h in range(H)]
    return torch.stack(rows)


@torch.no_grad()
def init_scales(module, x, y, cos, sin) -> dict:
    """Set `alpha` and `log_head_scale` by least squares on (x, y); returns the fit's
    relative residual for each candidate history weight."""
    hidden = y.shape[-1]
    with_bias = module.out_bias is not None
    ynorm = y.reshape(-1).float().pow(2).sum()  # judged against the teacher's whole output
    ob = getattr(module.teacher.o_proj, "bias", None)
    if ob is not None:  # finish() adds the teacher's o_proj bias itself: fit what is left of y
        y = y - ob.to(y.dtype)
    yf = y.reshape(-1).float()
    z1 = _per_head_contributions(module, x, cos, sin, torch.tensor([1.0, 0.0], device=x.device)).float()
    z2 = _per_head_contributions(module, x, cos, sin, torch.tensor([0.0, 1.0], device=x.device)).float()
    if with_bias:
        # the bias absorbs each output dim's mean: fit the scales on centred data, then the bias
        y_mean = y.reshape(-1, hidden).float().mean(0)
        yf = (y.reshape(-1, hidden).float() - y_mean).reshape(-1)
        z_means = []
        for z in (z1, z2):
            zm = z.reshape(z.shape[0], -1, hidden).mean(1)  # [H, hidden]
            z_means.append(zm)
            z.reshape(z.shape[0], -1, hidden).sub_(zm[:, None])
    best, report = None, {}
    for w1 in HISTORY_WEIGHTS:
        A = w1 * z1 + (1 - w1) * z2
        gram = A @ A.T + 1e-6 * torch.eye(A.shape[0], device=A.device) * A.pow(2).sum() / A.shape[0]
        c = torch.linalg.solve(gram, A @ yf)
        c = c.clamp_min(1e-3 * c.abs().max())  # a scale must stay positive (it is a log)
        rel = ((c @ A - yf).pow(2).sum() / ynorm).item()
        report[w1] = rel
        if best is None or rel < best[0]:
            best = (rel, w1, c)
    _, w1, c = best
    if with_bias:
        module.out_bias.copy_(y_mean - c @ (w1 * z_means[0] + (1 - w1) * z_means[1]))
    module.alpha.copy_(torch.tensor([math.log(w1), math.log(1 - w1)], device=module.alpha.device))
    module.log_head_scale.copy_(c.log().to(module.log_head_scale.dtype))
    return report
