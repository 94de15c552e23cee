"""The DSLA attention layer, built on a teacher softmax-attention layer.

q/k/v/o are the teacher's own projections (shared, not copied), optionally
corrected by low-rank deltas; what the layer adds is two low-rank gate
projections (history and recency decays, one per key dim of each kv head),
the per-layer state mixing `alpha`, and a per-head output scale. Only those
are parameters of this module, so `parameters()` is exactly what distillation
trains and what a layer checkpoint holds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dsla_prefill

GATE_NORMALIZER = 16.0  # as in GLA: keeps decays close to 1 at initialisation
GATE_FLOOR = -50.0


@dataclass(frozen=True)
class DSLAConfig:
    gate_rank: int = 16
    delta_rank: int = 0  # low-rank corrections on q/k/v/o; 0 = use the teacher's as they are
    history_bias: tuple = (3.0, 7.0)  # per-dim bias range: half-lives of ~200 to ~10k tokens
    recency_bias: tuple = (-4.0, 0.0)  # half-lives of ~3 to ~16 tokens
    chunk_size: int = 32
    # A learned constant added to the output. Softmax heads that park on a sink token emit a
    # near-constant vector that an unnormalised linear state cannot produce; a bias can.
    output_bias: bool = False

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        for key in ("history_bias", "recency_bias"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def apply_rope(x, cos, sin):
    """x [B,T,H,D]; cos/sin [B,T,D] in HF's rotate-half convention."""
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _LowRank(nn.Module):
    def __init__(self, d_in, d_out, rank, bias=False):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=bias)
        nn.init.normal_(self.down.weight, std=d_in ** -0.5)
        nn.init.zeros_(self.up.weight)  # starts as an exact no-op / constant gate

    def forward(self, x):
        return self.up(self.down(x))


class DSLAAttention(nn.Module):
    def __init__(self, teacher: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int,
                 hidden_size: int, cfg: DSLAConfig = DSLAConfig()):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # Kept outside the module tree: the teacher's weights are not ours to train or save.
        self._teacher = (teacher,)
        kd = num_kv_heads * head_dim
        self.gate1 = _LowRank(hidden_size, kd, cfg.gate_rank, bias=True)
        self.gate2 = _LowRank(hidden_size, kd, cfg.gate_rank, bias=True)
        with torch.no_grad():
            self.gate1.up.bias.copy_(torch.linspace(*cfg.history_bias, head_dim).repeat(num_kv_heads))
            self.gate2.up.bias.copy_(torch.linspace(*cfg.recency_bias, head_dim).repeat(num_kv_heads))
        self.alpha = nn.Parameter(torch.zeros(2))
        self.log_head_scale = nn.Parameter(torch.zeros(num_heads))
        if cfg.delta_rank > 0:
            qd = num_heads * head_dim
            self.deltas = nn.ModuleDict({
                "q": _LowRank(hidden_size, qd, cfg.delta_rank),
                "k": _LowRank(hidden_size, kd, cfg.delta_rank),
                "v": _LowRank(hidden_size, kd, cfg.delta_rank),
                "o": _LowRank(qd, hidden_size, cfg.delta_rank),
            })
        else:
            self.deltas = None
        self.out_bias = nn.Parameter(torch.zeros(hidden_size)) if cfg.output_bias else None

    @property
    def teacher(self):
        return self._teacher[0]

    def _proj(self, name, x):
        y = getattr(self.teacher, f"{name}_proj")(x)
        if self.deltas is not None:
            y = y + self.deltas[name](x)
        return y

    def merged_weight(self, name):
        """The `name` projection as one matrix: the teacher's weight plus its low-rank delta (summed
        in fp32, rounded once to the weight's dtype); what `_proj` computes in two steps."""
        w = getattr(self.teacher, f"{name}_proj").weight
        if self.deltas is None:
            return w
        d = self.deltas[name]
        return (w.float() + d.up.weight.float() @ d.down.weight.float()).to(w.dtype)

    def mix_weights(self):
        return torch.softmax(self.alpha.float(), dim=0)

    def gates(self, x):
        """Log decays [B,T,Hkv,Dk], fp32, in [GATE_FLOOR, 0]."""
        return self.gates_from_codes(self.gate1.down(x), self.gate2.down(x))

    def gates_from_codes(self, c1, c2):
        """gates(x) from the gates' low-rank codes gate1.down(x), gate2.down(x)."""
        shape = (*c1.shape[:-1], self.num_kv_heads, self.head_dim)
        g1 = nn.functional.logsigmoid(self.gate1.up(c1).float()) / GATE_NORMALIZER
        g2 = nn.functional.logsigmoid(self.gate2.up(c2).float()) / GATE_NORMALIZER
        return g1.clamp_min(GATE_FLOOR).view(shape), g2.clamp_min(GATE_FLOOR).view(shape)

    def project(self, x, cos, sin, qkv_weight=None, gate_down=None):
        """x [B,T,hidden] -> q [B,T,Hq,D], k/v/g1/g2 [B,T,Hkv,D]; RoPE applied to q and k.
        qkv_weight: the q/k/v projections as one [q;k;v] matrix (each `merged_weight`, for a teacher
        without biases); gate_down: both gates' down projections stacked. A serving runner keeps
        these for its frozen modules: three GEMMs where the op-by-op form launches up to eleven."""
        B, T, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if qkv_weight is None:
            q, k, v = self._proj("q", x), self._proj("k", x), self._proj("v", x)
        else:
            q, k, v = F.linear(x, qkv_weight).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k = apply_rope(q.view(B, T, Hq, D), cos, sin), apply_rope(k.view(B, T, Hkv, D), cos, sin)
        if gate_down is None:
            g1, g2 = self.gates(x)
        else:
            g1, g2 = self.gates_from_codes(*F.linear(x, gate_down).chunk(2, dim=-1))
        return q, k, v.view(B, T, Hkv, D), g1, g2

    def finish(self, o, head_scale=None, o_weight=None):
        """o [B,T,Hq,Dv] -> layer output [B,T,hidden]. head_scale: exp(log_head_scale) in o's dtype;
        o_weight: `merged_weight("o")` (both precomputed by a serving runner, like project's)."""
        hs = self.log_head_scale.exp().to(o.dtype) if head_scale is None else head_scale
        o = (o * hs[:, None]).reshape(*o.shape[:2], -1)
        if o_weight is not None:
            y = F.linear(o, o_weight, self.teacher.o_proj.bias)
        else:
            y = self.teacher.o_proj(o)
            if self.deltas is not None:
                y = y + self.deltas["o"](o)
        if self.out_bias is not None:
            y = y + self.out_bias.to(y.dtype)
        return y

    def forward(self, x, cos, sin, s1=None, s2=None):
        """Process a sequence piece; returns (output, s1, s2)."""
        q, k, v, g1, g2 = self.project(x, cos, sin)
        o, s1, s2 = dsla_prefill(q, k, v, g1, g2, self.mix_weights(), s1, s2,
                                 scale=1.0 / math.sqrt(self.head_dim), chunk_size=self.cfg.chunk_size)
        return self.finish(o), s1, s2
