"""What distilling one layer needs, captured once: the layer's inputs and the teacher's outputs.

Chained distillation trains layer l inside the current hybrid (every earlier layer already
DSLA), so its inputs must come from that hybrid. One no-grad forward per block, cut short
right after layer l's attention, gives both the input `x` entering layer l's attention and
the teacher attention's output `y` on that same input; training then needs only layer l's
own forward/backward per step instead of the whole model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class _Stop(Exception):
    """Raised from a hook to end a forward once the captured layer has run."""


@dataclass
class LayerData:
    x: torch.Tensor    # [N, T, hidden] input of layer l's attention (after the input norm)
    y: torch.Tensor    # [N, T, hidden] the teacher attention's output on x
    cos: torch.Tensor  # [1, T, D] rotary tables for positions 0..T-1
    sin: torch.Tensor
    resid: torch.Tensor | None = None  # [K, T, hidden] residual stream entering decoder layer l
                                       # (of the blocks the logits-KL phase replays)

    @property
    def num_blocks(self) -> int:
        return self.x.shape[0]


@torch.no_grad()
def capture_layer(hybrid, layer: int, blocks: torch.Tensor, batch: int = 2,
                  resid_blocks: int | list[int] = 0) -> LayerData:
    """Run `blocks` [N, T] through `hybrid` as it is (its DSLA layers included) with `layer`
    itself in teacher form, and keep what enters and leaves that layer's attention (and,
    for `resid_blocks` (the first k, or these block indices), the residual stream entering
    the decoder layer)."""
    sw = hybrid.attention(layer)
    was_dsla = sw.use_dsla
    sw.use_dsla = False
    got: dict = {}

    def pre(_mod, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        got["x"] = x.detach().clone()
        got["pe"] = kwargs["position_embeddings"]

    def post(_mod, _args, _kwargs, out):
        got["y"] = out[0].detach().clone()
        raise _Stop

    def pre_layer(_mod, args, kwargs):
        got["r"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()

    h1 = sw.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = sw.register_forward_hook(post, with_kwargs=True)
    h3 = hybrid.decoder_layers[layer].register_forward_pre_hook(pre_layer, with_kwargs=True)
    xs, ys, rs, pe = [], [], [], None
    try:
        for i in range(0, blocks.shape[0], batch):
            try:
                hybrid(blocks[i:i + batch])
            except _Stop:
                pass
            xs.append(got["x"])
            ys.append(got["y"])
            rs.append(got["r"])
            pe = got["pe"]
    finally:
        h1.remove()
        h2.remove()
        h3.remove()
        sw.use_dsla = was_dsla
    cos, sin = pe
    idx = list(range(resid_blocks)) if isinstance(resid_blocks, int) else list(resid_blocks)
    resid = torch.cat(rs)[idx] if idx else None
    return LayerData(torch.cat(xs), torch.cat(ys), cos[:1].clone(), sin[:1].clone(), resid)
