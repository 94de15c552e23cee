"""Tiny random Llama models, saved as HF directories (with the default model's tokenizer,
so the corpus can be tokenised), for distillation tests that run in seconds."""
import pytest
import torch

from tests.conftest import tiny_model


def tiny_hybrid(layers=3, seed=0, dsla=None, **kw):
    from dsla_model.dsla_attention import DSLAConfig
    from dsla_model.hybrid import HybridModel

    model = tiny_model(layers=layers, seed=seed, **kw)
    return HybridModel(model, dsla or DSLAConfig(delta_rank=2, output_bias=True, chunk_size=8))


def tiny_blocks(n=4, T=48, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 3-layer random Llama with the real tokenizer's vocabulary, on disk."""
    from transformers import AutoTokenizer

    from dsla_model.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = tiny_model(layers=3, seed=1, vocab=len(tok))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
