"""bench/context_quality.py's per-window perplexity: the windows partition the next-token losses."""
import math

import torch

from bench.context_quality import window_nll
from tests.conftest import randomize_dsla, tiny_model


def test_windows_average_to_the_models_own_loss():
    from dsla_model.hybrid import HybridModel

    model = tiny_model(seed=3)
    h = HybridModel(model)
    ids = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(4)).tolist()
    w = window_nll(h, ids, 16)  # 49 next-token losses: windows of 16, 16, 16, 1
    assert len(w) == 4
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert math.isclose((16 * (w[0] + w[1] + w[2]) + w[3]) / 49, loss, rel_tol=1e-5)
    h.convert(1)
    randomize_dsla(h, 5)
    w2 = window_nll(h, ids, 16)
    assert w2[0] != w[0] and all(math.isfinite(x) for x in w2)
