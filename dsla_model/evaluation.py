"""Quality of a hybrid against its teacher: perplexity ratio, top-1 agreement, KL, passkey.

The teacher's log-probabilities are computed once per block and kept (fp16) so that each
conversion ratio costs one hybrid forward per block, not two.
"""
from __future__ import annotations

import math
import time

import torch

from dsla_model.order_cache import layers_for_conversion


def text_blocks(tokenizer, block_size: int = 512, max_blocks: int = 8, text_file: str | None = None,
                split: str = "validation") -> torch.Tensor:
    """[N, block_size] token blocks: of `text_file` when given, else of the corpus split."""
    if text_file is not None:
        with open(text_file, encoding="utf-8", errors="replace") as f:
            ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
        blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)][:max_blocks]
    else:
        from dsla_model.corpus import token_blocks

        blocks = token_blocks(tokenizer, split, block_size, max_blocks)
    if not blocks:
        raise ValueError(f"the text holds fewer than {block_size} tokens: no block to evaluate")
    return torch.tensor(blocks)


class TeacherReference:
    """The teacher's next-token log-probs on fixed blocks (computed with no DSLA layer)."""

    @torch.no_grad()
    def __init__(self, hybrid, blocks: torch.Tensor):
        saved = hybrid.dsla_layers
        hybrid.set_dsla_layers([])
        try:
            self.blocks = blocks
            dev = next(hybrid.parameters()).device
            self.logprobs = [torch.log_softmax(hybrid(blocks[i:i + 1].to(dev))[0, :-1].float(), -1).half().cpu()
                             for i in range(blocks.shape[0])]
        finally:
            for layer in saved:
                hybrid.convert(layer)
        self.metrics = self._score([lp.float() for lp in self.logprobs])

    def _score(self, student_logprobs) -> dict:
        nll, agree, kl, n = 0.0, 0, 0.0, 0
        for i, lps in enumerate(student_logprobs):
            targets = self.blocks[i, 1:]
            lpt = self.logprobs[i].float()
            nll += -lps.gather(-1, targets[:, None]).sum().item()
            agree += (lps.argmax(-1) == lpt.argmax(-1)).sum().item()
            kl += (lpt.exp() * (lpt - lps)).sum().item()
            n += targets.numel()
        return {"ppl": math.exp(nll / n), "top1_agreement": agree / n, "kl": kl / n, "tokens": n}

    @torch.no_grad()
    def score(self, hybrid) -> dict:
        """ppl, top-1 agreement and KL(teacher || hybrid) per token of the hybrid as it is."""
        dev = next(hybrid.parameters()).device
        lps = [torch.log_softmax(hybrid(self.blocks[i:i + 1].to(dev))[0, :-1].float(), -1).cpu()
               for i in range(self.blocks.shape[0])]
        return self._score(lps)


PASSKEY_CONTEXTS = (512, 1024, 2048)


def evaluate_conversions(hybrid, tokenizer, conversions, order, apply_layers, blocks: torch.Tensor,
                         passkey: bool = False, passkey_trials: int = 4, passkey_contexts=PASSKEY_CONTEXTS,
                         log=None) -> list[dict]:
    """One result per conversion ratio. `apply_layers(hybrid, layers)` converts exactly
    those layers (e.g. LayerStore.apply); the hybrid is reset to all-attention first."""
    from dsla_model.passkey import passkey_accuracy

    ref = TeacherReference(hybrid, blocks)
    teacher_passkey = None
    results = []
    for c in conversions:
        t0 = time.time()
        layers = layers_for_conversion(order, c)
        hybrid.set_dsla_layers([])
        apply_layers(hybrid, layers)
        m = ref.score(hybrid) if layers else dict(ref.metrics)
        r = {"conversion": c, "dsla_layers": layers, "ppl": round(m["ppl"], 4),
             "teacher_ppl": round(ref.metrics["ppl"], 4), "ppl_ratio": round(m["ppl"] / ref.metrics["ppl"], 4),
             "top1_agreement": round(m["top1_agreement"], 4), "kl": round(m["kl"], 5), "tokens": m["tokens"]}
        if passkey:
            pk = passkey_accuracy(hybrid, tokenizer, passkey_contexts, passkey_trials)
            if not layers:
                teacher_passkey = pk
            r["passkey_accuracy"] = round(pk["mean"], 4)
            r["passkey_by_context"] = {k: v for k, v in pk.items() if k != "mean"}
            if teacher_passkey is not None:
                r["teacher_passkey_accuracy"] = round(teacher_passkey["mean"], 4)
        r["seconds"] = round(time.time() - t0, 1)
        if log is not None:
            log(r)
        results.append(r)
    hybrid.set_dsla_layers([])
    return results
