"""The model runner: the decoder's forward pass over the engine's cache pool.

Written over the HF model's own submodules (embed_tokens, each layer's norms,
attention projections and MLP, final norm, lm_head, rotary table) rather than
HF's forward, so the cache layout is ours. Every layer is computed under the
batch's pinned `LayerConfig`: softmax attention (paged KV) where its module is
None, the pinned DSLA module (state pairs in the pool) otherwise. The runner
never reads the model's current use_dsla flags.

Two entry points:
  - `forward_pieces`: any mix of prefill chunks and decode tokens; tokens are laid
    end to end ([1, N, hidden]) so the per-token work (projections, norms, MLP)
    is one batched call, and the sequence-mixing work (attention, DSLA prefill)
    is done per sequence.
  - `forward_decode`: one token per sequence with static shapes and no Python
    branching on data: what the CUDA graphs capture.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from dsla_model.dsla_attention import GATE_FLOOR, GATE_NORMALIZER, apply_rope
from dsla_model.engine.attention import attend_pieces, paged_decode
from dsla_model.loading import max_positions
from kernels import dsla_decode_slots, dsla_decode_step, dsla_prefill
from kernels.decode_io import step_inputs
from kernels.gemv_epilogue import Epilogue, norm_parts, rms_normalize


def _have_fused_kernels() -> bool:
    try:
        import kernels.triton_paged_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _rope_table(rotary_emb, max_len: int, positions: int | None, x: torch.Tensor):
    """cos, sin [1, max_len, D] for every step. A position's rotation depends on that position
    alone, except under dynamic RoPE (HF's dynamic_rope_update), where a call reaching past the
    model's positions rescales every frequency and leaves the module scaled until a call shorter
    than them resets it. So: a one-position call resets it, the positions the model has come from
    a call of their own (what the model gives any sequence that fits them), those past them from a
    call reaching max_len, and a last reset leaves the module as the model had it."""
    have = min(max_len, positions or max_len)
    reset = torch.zeros(1, 1, dtype=torch.long, device=x.device)
    rotary_emb(x, reset)
    cos, sin = rotary_emb(x, torch.arange(have, device=x.device)[None])
    if have < max_len:
        c2, s2 = rotary_emb(x, torch.arange(max_len, device=x.device)[None])
        rotary_emb(x, reset)
        cos, sin = torch.cat([cos, c2[:, have:]], 1), torch.cat([sin, s2[:, have:]], 1)
    return cos, sin


def _longrope_original(config) -> int | None:
    """The original context length of a longrope model, else None. HF's longrope rotates every
    position of a call with the short factors while the call stays within it and with the long
    ones once it reaches past it: the positions it has are these, not max_position_embeddings."""
    params = getattr(config, "rope_parameters", None)  # transformers 5.x; 4.x: rope_scaling
    rope = params or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    # 5.x reads the length from the RoPE parameters, 4.x from the config itself
    orig = (params.get("original_max_position_embeddings") if params
            else getattr(config, "original_max_position_embeddings", None))
    return orig or max_positions(config)


def fold_reserve_bytes(hybrid) -> int:
    """GPU memory the folded projections of DSLA layers with deltas can take (`_frozen_consts`):
    a q/k/v/o copy per layer. Counted for every layer: the policy converts at most half of them,
    and during a swap the outgoing modules' copies live until their last request ends."""
    if not getattr(hybrid.dsla_config, "delta_rank", 0):
        return 0
    total = 0
    for layer in hybrid.model.model.layers:
        t = layer.self_attn
        t = getattr(t, "teacher", t)
        total += sum(getattr(t, f"{n}_proj").weight.nbytes for n in "qkvo")
    return total


class ModelRunner:
    def __init__(self, hybrid, pool, max_model_len: int):
        self.hybrid = hybrid
        self.pool = pool
        lm = hybrid.model
        self.inner = lm.model
        self.lm_head = lm.lm_head
        p = self.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        self.Hq, self.Hkv, self.D = hybrid.num_heads, hybrid.num_kv_heads, hybrid.head_dim
        x0 = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
        orig = _longrope_original(hybrid.config)
        # HF prefills a prompt in one call: under longrope, one longer than the original context has
        # the long factors at every position, those before it included (forward_pieces reads this table)
        self.long_from = orig if orig is not None and max_model_len > orig else None
        with torch.no_grad():
            if self.long_from is not None:
                c, s = self.inner.rotary_emb(x0, torch.arange(max_model_len, device=self.device)[None])
                self.cos_long, self.sin_long = c[0], s[0]
            cos, sin = _rope_table(self.inner.rotary_emb, max_model_len, orig or max_positions(hybrid.config), x0)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, D]
        t = self.inner.layers[0].self_attn.teacher
        self.scale = getattr(t, "scaling", None) or self.D ** -0.5
        # the fused kernels tile a head with tl.arange(0, D): a head dim that is not a power of two
        # (e.g. 80, 100) decodes op by op
        self.fused_decode = self.device.type == "cuda" and _have_fused_kernels() and not self.D & (self.D - 1)
        self._consts = weakref.WeakKeyDictionary()  # DSLA module -> _frozen_consts' tuple
        if self.fused_decode:
            self._fuse_weights()

    def long_rope(self, req) -> bool:
        """Whether every position of req rotates with longrope's long factors (`cos_long`): its prompt
        proper reaches past the original context, as HF's one-call prefill of it does. A resumed
        request's last resume_tokens prompt tokens are an earlier attempt's output, decoded token by
        token: they do not make its prompt long (the shared table rotates them as that attempt did)."""
        return self.long_from is not None and req.num_prompt - req.params.resume_tokens > self.long_from

    def needs_long_table(self, items) -> bool:
        """Whether a token of items rotates with the long factors at a position where the shared
        table (what forward_decode and its graphs read) has the short ones: a one-token prompt
        chunk of a long prompt. Such items must take forward_pieces."""
        return any(self.long_rope(it.req) and it.start < self.long_from for it in items)

    # ---- shared layer pieces ------------------------------------------------------------
    def _qkv(self, teacher, h, cos, sin):
        B, T, _ = h.shape
        q = teacher.q_proj(h).view(B, T, self.Hq, self.D)
        k = teacher.k_proj(h).view(B, T, self.Hkv, self.D)
        v = teacher.v_proj(h).view(B, T, self.Hkv, self.D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _write_kv(self, k, v, blk, off):
        """k, v [N,Hkv,D] to token slots (blk[N], off[N]) of the pool."""
        kv = self.pool.kv
        kv[blk, 0, off] = k
        kv[blk, 1, off] = v

    def _layers(self, x, attn_fn):
        for i, layer in enumerate(self.inner.layers):
            h = layer.input_layernorm(x)
            x = x + attn_fn(i, h)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    # ---- general form: prefill chunks and decode tokens ---------------------------------
    @torch.no_grad()
    def forward_pieces(self, conf, items, want: list[int]):
        """items: WorkItems (req, start, n) of one LayerConfig; returns logits [len(want), V]
        of the last token of items[want[j]]."""
        dev, bs = self.device, self.pool.block_size
        ids = [t for it in items for t in it.req.tokens[it.start:it.start + it.n]]
        pos_list = [p for it in items for p in range(it.start, it.start + it.n)]
        ids = torch.tensor(ids, device=dev)
        pos = torch.tensor(pos_list, device=dev)
        seq_of = torch.tensor([i for i, it in enumerate(items) for _ in range(it.n)], device=dev)
        nb = max(it.req.cache.table.shape[1] for it in items)
        tables = torch.zeros(len(conf.modules), len(items), nb, dtype=torch.int64)
        for i, it in enumerate(items):
            tables[:, i, :it.req.cache.table.shape[1]] = it.req.cache.table
        tables = tables.to(dev)
        wblk = tables[:, seq_of, pos // bs]  # [L, N]: each token's block, per layer
        woff = pos % bs
        slots = torch.stack([it.req.cache.slots for it in items], 1).to(dev)  # [L, B]
        cos, sin = self.cos[pos], self.sin[pos]
        if self.long_from is not None:
            long = torch.tensor([self.long_rope(it.req) for it in items for _ in range(it.n)], device=dev)
            cos = torch.where(long[:, None], self.cos_long[pos], cos)
            sin = torch.where(long[:, None], self.sin_long[pos], sin)
        cos, sin = cos[None], sin[None]
        pieces = [(it.start, it.n) for it in items]
        firsts = [sum(it.n for it in items[:i]) for i in range(len(items))]
        dec = [i for i, it in enumerate(items) if it.n == 1]
        dec_tok = torch.tensor([firsts[i] for i in dec], device=dev, dtype=torch.int64)
        pre = [i for i, it in enumerate(items) if it.n > 1]

        def attn(layer, h):
            mod = conf.modules[layer]
            if mod is None:
                t = self.inner.layers[layer].self_attn.teacher
                q, k, v = self._qkv(t, h, cos, sin)
                self._write_kv(k[0], v[0], wblk[layer], woff)
                o = attend_pieces(q[0], self.pool.kv, tables[layer], pieces, self.scale)
                return t.o_proj(o.reshape(1, -1, self.Hq * self.D))
            w, kw = self._prefill_consts(layer, mod)
            q, k, v, g1, g2 = mod.project(h, cos, sin, kw["qkv_weight"], kw["gate_down"])
            scale = 1.0 / math.sqrt(self.D)
            o = torch.empty_like(q) if dec or len(pre) > 1 else None  # one piece: the kernel's output as is
            if dec:
                s = slots[layer, dec]
                o[0, dec_tok] = dsla_decode_slots(q[0, dec_tok], k[0, dec_tok], v[0, dec_tok], g1[0, dec_tok],
                                                  g2[0, dec_tok], w, self.pool.s1, self.pool.s2, s, scale)
            for i in pre:
                a, n, s = firsts[i], items[i].n, int(items[i].req.cache.slots[layer])
                sl = slice(a, a + n)
                # the pooled states in fp32 (a bf16 pool widened; neither form writes its initial
                # states), the final ones rounded back by copy_
                out, s1, s2 = dsla_prefill(q[:, sl], k[:, sl], v[:, sl], g1[:, sl], g2[:, sl], w,
                                           self.pool.s1[s:s + 1].float(), self.pool.s2[s:s + 1].float(),
                                           scale=scale, chunk_size=mod.cfg.chunk_size)
                if o is None:
                    o = out
                else:
                    o[:, sl] = out
                self.pool.s1[s].copy_(s1[0])
                self.pool.s2[s].copy_(s2[0])
            return mod.finish(o, kw["head_scale"], kw["o_weight"])

        x = self._layers(self.inner.embed_tokens(ids)[None], attn)
        if not want:
            return None
        last = torch.tensor([firsts[i] + items[i].n - 1 for i in want], device=dev, dtype=torch.int64)
        return self.lm_head(self.inner.norm(x[0, last]))

    # ---- decode form: static shapes, capturable -----------------------------------------
    @torch.no_grad()
    def forward_decode(self, conf, ids, pos, tables, slots, num_splits=None):
        """ids, pos [B]; tables [L,B,nb]; slots [L,B] (all on device) -> logits [B,V]."""
        if self.fused_decode:
            return self._forward_decode_fused(conf, ids, pos, tables, slots, num_splits)
        B = ids.shape[0]
        bs = self.pool.block_size
        rows = torch.arange(B, device=ids.device)
        wblk = tables[:, rows, pos // bs]  # [L,B]
        woff = pos % bs
        lens = pos + 1
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B,1,D]

        def attn(layer, h):
            mod = conf.modules[layer]
            if mod is None:
                t = self.inner.layers[layer].self_attn.teacher
                q, k, v = self._qkv(t, h, cos, sin)
                self._write_kv(k[:, 0], v[:, 0], wblk[layer], woff)
                o = paged_decode(q[:, 0], self.pool.kv, tables[layer], lens, self.scale, num_splits)
                return t.o_proj(o.reshape(B, 1, self.Hq * self.D))
            q, k, v, g1, g2 = mod.project(h, cos, sin)
            o = dsla_decode_slots(q[:, 0], k[:, 0], v[:, 0], g1[:, 0], g2[:, 0], mod.mix_weights(),
                                  self.pool.s1, self.pool.s2, slots[layer], 1.0 / math.sqrt(self.D))
            return mod.finish(o[:, None])

        x = self._layers(self.inner.embed_tokens(ids)[:, None], attn)
        return self.lm_head(self.inner.norm(x[:, 0]))

    def _fuse_weights(self):
        """Give each layer one [q;k;v] and one [gate;up] weight matrix, and make the HF
        modules' weights views into them: same values, no extra memory, and a batch-1
        decode step reads them in 2 wide GEMVs instead of 5 narrow ones."""
        self.qkv_w, self.gate_up_w = [], []

        def fuse(mods):
            if any(m.bias is not None for m in mods):
                return None
            w = torch.cat([m.weight.detach() for m in mods]).contiguous()
            a = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight = torch.nn.Parameter(w[a:a + n], requires_grad=m.weight.requires_grad)
                a += n
            return w

        for layer in self.inner.layers:
            t = layer.self_attn.teacher
            self.qkv_w.append(fuse([t.q_proj, t.k_proj, t.v_proj]))
            mlp = layer.mlp
            ok = hasattr(mlp, "gate_proj") and getattr(mlp.config, "hidden_act", "silu") == "silu"
            self.gate_up_w.append(fuse([mlp.gate_proj, mlp.up_proj]) if ok else None)

    def _qkv_flat(self, i, t, hg, sq, eps, w2=None, w=None):
        """[q|k|v] projections of rmsnorm(h) given as (hg, sq) (gemv_epilogue.norm_parts); with
        w2 also rmsnorm(h) @ w2.T (returned second). w: a [q;k;v] weight to use instead of layer i's."""
        from kernels.gemv_dispatch import linear

        w = self.qkv_w[i] if w is None else w
        if w is not None:
            return linear(hg, w, w2, Epilogue(rstd_sq=sq, eps=eps))
        h = rms_normalize(hg, sq, eps)
        qkv = torch.cat([t.q_proj(h), t.k_proj(h), t.v_proj(h)], dim=-1)
        return qkv if w2 is None else (qkv, F.linear(h, w2))

    @staticmethod
    def _add_out(x, proj, inp, norm_weight, bias=None, weight=None):
        """The residual stream after x + proj(inp) (+ bias), and the next RMSNorm's (hg, sq):
        in the GEMV's epilogue for a projection without a bias of its own (an extra bias joins the
        residual first), by separate ops otherwise. weight: used instead of proj's."""
        from kernels.gemv_dispatch import linear

        weight = proj.weight if weight is None else weight
        if proj.bias is None:
            res = x if bias is None else x + bias.to(x.dtype)
            return linear(inp, weight, epi=Epilogue(residual=res, norm_weight=norm_weight))
        a = F.linear(inp, weight, proj.bias)
        return ModelRunner._add(x, a if bias is None else a + bias.to(x.dtype), norm_weight)

    @staticmethod
    def _add(x, a, norm_weight):
        y = x + a
        return (y, *norm_parts(y, norm_weight))

    def _prefill_consts(self, i, mod):
        """(mixing weights, keyword arguments of mod.project / mod.finish) for a prefill piece. The fused
        (CUDA) runner passes what `_frozen_consts` keeps for decode: [q;k;v] in one GEMM (with the deltas
        folded in), both gates' codes in one, the head scales and the folded o projection, instead of
        the op-by-op forms' up to fifteen launches more (a DSLA layer's piece took twice an attention
        layer's host time: bench/results/engine_prefill.md). Elsewhere, the module's own forms."""
        none = dict(qkv_weight=None, gate_down=None, head_scale=None, o_weight=None)
        if not self.fused_decode:
            return mod.mix_weights(), none
        w, head_scale, gate_down, folded = self._frozen_consts(mod)
        qkv = None
        if self.qkv_w[i] is not None:  # the teacher's q/k/v have no biases (merged weights carry none)
            qkv = folded[0] if folded is not None else self.qkv_w[i]
        return w, dict(qkv_weight=qkv, gate_down=gate_down, head_scale=head_scale,
                       o_weight=None if folded is None else folded[1])

    def _fused_step(self, i, mod) -> bool:
        """The fused DSLA path covers low-rank gates with an up bias; low-rank deltas too, folded
        into the projections (`_frozen_consts`), where the teacher's q/k/v/o have no bias."""
        if mod.gate1.up.bias is None or mod.gate2.up.bias is None:
            return False
        return mod.deltas is None or (self.qkv_w[i] is not None and mod.teacher.o_proj.bias is None)

    @staticmethod
    def _gate_w(g):
        return g.up.weight, g.up.bias

    def _frozen_consts(self, mod):
        """Mixing weights, head scales, both gates' down projections stacked, and, for a module
        with low-rank deltas, its [q;k;v] and o weights with them folded in (W + U D, summed in
        fp32 and rounded once: one plain GEMV each instead of the teacher's plus eight thin
        low-rank products a step; a converted layer then holds its own copy of those weights).
        Computed once per served module, outside any graph capture (the first eager warm-up
        fills this). Served modules are frozen: new weights arrive as new module objects
        (set_conversion), never as in-place edits."""
        c = self._consts.get(mod)
        if c is None:
            with torch.no_grad():
                folded = None
                if mod.deltas is not None:
                    folded = (torch.cat([mod.merged_weight(n) for n in "qkv"]).contiguous(),
                              mod.merged_weight("o").contiguous())
                c = (mod.mix_weights().detach().contiguous(),
                     mod.log_head_scale.exp().to(self.dtype).detach().reshape(-1).contiguous(),
                     # both gates' down projections stacked: one GEMV gives both low-rank codes
                     torch.cat([mod.gate1.down.weight, mod.gate2.down.weight]).detach().contiguous(), folded)
            self._consts[mod] = c
        return c

    def _forward_decode_fused(self, conf, ids, pos, tables, slots, num_splits):
        """The CUDA decode step with fused kernels: every residual add, RMSNorm and SiLU*up in
        a projection's epilogue (triton_gemv.Epilogue), RoPE+cache write, paged attention, a
        DSLA layer's step from its projections to its o projection's input. Same math as the
        op-by-op form, rounded once per fused kernel instead of once per op."""
        from kernels.gemv_dispatch import linear
        from kernels.triton_paged_attention import paged_decode_attention, rope_and_cache_write

        B = ids.shape[0]
        nq, nkv = self.Hq * self.D, self.Hkv * self.D
        layers = self.inner.layers
        ln = layers[0].input_layernorm
        x, hg, sq, cos, sin, wblk, woff, lens = step_inputs(ids, pos, self.inner.embed_tokens.weight, ln.weight,
                                                            self.cos, self.sin, tables, self.pool.block_size)
        for i, layer in enumerate(layers):
            mod = conf.modules[i]
            t = layer.self_attn.teacher
            eps = ln.variance_epsilon
            ln = layer.post_attention_layernorm
            if mod is None:
                qkv = self._qkv_flat(i, t, hg, sq, eps)
                q = rope_and_cache_write(qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:], cos, sin,
                                         self.pool.kv, wblk[i], woff)
                o = paged_decode_attention(q, self.pool.kv, tables[i], lens, self.scale, num_splits)
                x, hg, sq = self._add_out(x, t.o_proj, o.view(B, nq), ln.weight)
            elif self._fused_step(i, mod):
                w, head_scale, down, folded = self._frozen_consts(mod)
                qkv_w, o_w = folded if folded is not None else (None, None)
                # q/k/v and both gates' down projections share h: one launch reads all their weights
                qkv, code = self._qkv_flat(i, t, hg, sq, eps, down, w=qkv_w)
                # RoPE, gates, state step and head scales (mod.finish's first op) in one launch
                o = dsla_decode_step(qkv, code, self._gate_w(mod.gate1), self._gate_w(mod.gate2), cos, sin, w,
                                     head_scale, self.pool.s1, self.pool.s2, slots[i], self.Hq, self.Hkv,
                                     GATE_NORMALIZER, GATE_FLOOR, 1.0 / math.sqrt(self.D))
                x, hg, sq = self._add_out(x, t.o_proj, o.view(B, nq), ln.weight, getattr(mod, "out_bias", None),
                                          weight=o_w)
            else:
                h = rms_normalize(hg, sq, eps)
                q, k, v, g1, g2 = mod.project(h[:, None], cos[:, None], sin[:, None])
                o = dsla_decode_slots(q[:, 0], k[:, 0], v[:, 0], g1[:, 0], g2[:, 0], mod.mix_weights(),
                                      self.pool.s1, self.pool.s2, slots[i], 1.0 / math.sqrt(self.D))
                x, hg, sq = self._add(x, mod.finish(o[:, None])[:, 0], ln.weight)
            eps = ln.variance_epsilon
            ln = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.inner.norm
            w = self.gate_up_w[i]
            if w is None:
                x, hg, sq = self._add(x, layer.mlp(rms_normalize(hg, sq, eps)), ln.weight)
            else:
                m = linear(hg, w, epi=Epilogue(rstd_sq=sq, eps=eps, gated=True))
                x, hg, sq = self._add_out(x, layer.mlp.down_proj, m, ln.weight)
        logits = linear(hg, self.lm_head.weight, epi=Epilogue(rstd_sq=sq, eps=ln.variance_epsilon))
        return logits if self.lm_head.bias is None else logits + self.lm_head.bias
