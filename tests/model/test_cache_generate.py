"""HF `generate` strategies that rearrange or trim the cache, with DSLA layers in it."""
import torch

from dsla_model.hybrid import HybridModel
from tests.conftest import randomize_dsla, tiny_model


def _hybrid(kind="llama", layers=(), seed=0, **kw):
    h = HybridModel(tiny_model(kind, seed=seed, **kw))
    for i in layers:
        h.convert(i)
    randomize_dsla(h, seed)
    return h


def _prompt(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_beam_search_with_hybrid_cache_matches_no_cache():
    """Beam search reorders the cache rows after every step: the DSLA states must follow their
    beams like the KV does, or a beam continues from another beam's state."""
    h = _hybrid(layers=range(4))
    ids = _prompt(12)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = h.model.generate(input_ids=ids, use_cache=False, **kw)
    assert h.generate(ids, **kw).tolist() == ref.tolist()

