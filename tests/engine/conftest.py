"""Engine test fixtures: tiny hybrids with DSLA layers, and the default model (slow).

Torch is limited to one thread here: the development machines have 2 cores
shared by several engineers, and oversubscribed BLAS threads make these small
matmuls tens of times slower.
"""
import pytest
import torch

from tests.conftest import randomize_dsla, skip_without_default_model, tiny_model

torch.set_num_threads(1)


def tiny_hybrid(dsla_layers=(1, 3), seed=0, **kw):
    from dsla_model.hybrid import HybridModel

    h = HybridModel(tiny_model(seed=seed, **kw))
    for i in dsla_layers:
        h.convert(i)
    randomize_dsla(h, seed)
    return h


def random_prompts(n, vocab, lo=3, hi=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


@pytest.fixture
def hybrid():
    return tiny_hybrid()


@pytest.fixture(scope="module")
def default_hybrid():
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import load_model

    skip_without_default_model()
    model, tok, _ = load_model("default")
    return HybridModel(model), tok


def padded_decode_inputs(items, num_layers, pad_rows):
    """The static-shape decode inputs (what a captured graph takes) for scheduled items, plus
    `pad_rows` padding rows that point at the pool's scratch group (index 0)."""
    nb = max(it.req.cache.table.shape[1] for it in items)
    rows = len(items) + pad_rows
    tables = torch.zeros(num_layers, rows, nb, dtype=torch.int64)
    slots = torch.zeros(num_layers, rows, dtype=torch.int64)
    for i, it in enumerate(items):
        tables[:, i, :it.req.cache.table.shape[1]] = it.req.cache.table
        slots[:, i] = it.req.cache.slots
    ids = torch.tensor([it.req.tokens[it.start] for it in items] + [0] * pad_rows)
    pos = torch.tensor([it.start for it in items] + [0] * pad_rows)
    return ids, pos, tables, slots


def pipelined(engine):
    """Give a CPU engine the pipelined decode path of CUDA graphs, run eagerly (capture=False)."""
    from dsla_model.engine.cuda_graphs import DecodeGraphs

    engine.graphs = DecodeGraphs(engine.runner, engine.config.max_running, engine.max_model_len, capture=False)
    chains = []
    chain = engine._chain
    engine._chain = lambda: chains.append(1) or chain()
    engine.chained_steps = chains  # tests check the chained path really ran
    return engine
