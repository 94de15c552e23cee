"""The logits-KL phase: a few steps that tune layer l's DSLA parameters on what matters.

Matching layer l's attention output (MSE) weighs every direction of the output equally;
the rest of the network does not. A short phase on KL(teacher || hybrid) of the final
logits corrects that. It replays only the tail of the model: the residual stream entering
decoder layer l was captured with the layer's inputs, so a step costs layers l..L-1 plus
the LM head (cheap for the late layers that the sensitivity order converts first).
"""
from __future__ import annotations

import torch


def tail_logits(hybrid, layer: int, resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Logits of the hybrid as it is, from the residual stream entering decoder layer `layer`.
    attention_mask=None is causal for SDPA attention and irrelevant to DSLA layers."""
    B = resid.shape[0]
    pe = (cos.expand(B, -1, -1), sin.expand(B, -1, -1))
    h = resid
    for j in range(layer, hybrid.num_layers):
        h = hybrid.decoder_layers[j](h, attention_mask=None, position_embeddings=pe)
        h = h[0] if isinstance(h, tuple) else h
    inner = hybrid.model.model
    return hybrid.model.lm_head(inner.norm(h))


@torch.no_grad()
def teacher_logprobs(hybrid, blocks: torch.Tensor) -> torch.Tensor:
    """[K, T, V] fp16 log-probs of the all-attention teacher (computed once per chain)."""
    saved = hybrid.dsla_layers
    hybrid.set_dsla_layers([])
    try:
        return torch.stack([torch.log_softmax(hybrid(blocks[i:i + 1])[0].float(), -1).half()
                            for i in range(blocks.shape[0])])
    finally:
        for layer in saved:
            hybrid.convert(layer)


def kl_to_teacher(logits: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student)."""
    lp = torch.log_softmax(logits.float(), -1)
    t = teacher_lp.float()
    return (t.exp() * (t - lp)).sum(-1).mean()


def kl_phase(hybrid, layer: int, module, data, teacher_lp: torch.Tensor, steps: int, lr: float,
             batch: int = 1) -> dict:
    """Train `module` (installed as layer `layer`'s DSLA form meanwhile) on the logits KL,
    `batch` replayed blocks per step. The last quarter of the replayed blocks (at least the
    last one, which the chain makes the MSE phase's held-out block) is held out: the phase
    never trains on it and keeps its weights only if the KL there did not grow (with one block
    it has to judge on the block it trained on: `kl_held_out` False)."""
    sw = hybrid.attention(layer)
    prev_mod, prev_flag = sw.dsla, sw.use_dsla
    hybrid.install(layer, module)
    sw.use_dsla = True
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    K = data.resid.shape[0]
    n_hold = max(1, K // 4)
    n_train = K - n_hold if K >= 2 else K
    held = list(range(K - n_hold, K))

    def held_out_kl():
        return sum(kl_to_teacher(tail_logits(hybrid, layer, data.resid[i:i + 1], data.cos, data.sin),
                                 teacher_lp[i:i + 1]).item() for i in held) / len(held)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        with torch.no_grad():
            before = held_out_kl()
        last = before
        batch = max(1, min(batch, n_train))
        for step in range(steps):
            idx = [(step * batch + j) % n_train for j in range(batch)]
            loss = kl_to_teacher(tail_logits(hybrid, layer, data.resid[idx], data.cos, data.sin), teacher_lp[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            last = loss.item()
        with torch.no_grad():
            after = held_out_kl()
        kept = after <= before  # False for a NaN too (a diverged phase)
        if not kept:  # a few noisy steps made it worse: keep the MSE-trained weights
            with torch.no_grad():
                for p, v in zip(module.state_dict().values(), saved.values()):
                    p.copy_(v)
    finally:
        sw.dsla, sw.use_dsla = prev_mod, prev_flag
    for p in params:  # installed for the rest of the chain: no gradient buffers kept with it
        p.grad = None
    return {"kl_kept": kept, "kl_before": round(before, 5), "kl_after": round(after, 5), "kl_steps": steps,
            "kl_last": round(last, 5), "kl_held_out": K >= 2}
