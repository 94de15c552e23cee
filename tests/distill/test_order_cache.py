"""The cached sensitivity order (dsla_model/order_cache.py): a torn or wrong file is recomputed."""
from __future__ import annotations

import pytest

from dsla_model import order_cache
from tests.distill.conftest import tiny_hybrid


@pytest.mark.parametrize("content", ['{"order": [3, 1', '{"order": [0, 1, 2, 7], "entropy": [1, 2, 3, 4]}', "[]",
                                     '{"order": [true, 0, 2], "entropy": [1, 2, 3]}',  # sorts like [0, 1, 2]
                                     '{"order": ["a", 0, 2], "entropy": [1, 2, 3]}'])
def test_a_torn_or_wrong_cache_file_is_recomputed(tmp_path, monkeypatch, content):
    h = tiny_hybrid()
    monkeypatch.setattr(order_cache, "cache_root", lambda: tmp_path)
    calls = []

    def measure(hybrid, tokenizer, num_prompts):
        calls.append(num_prompts)
        n = hybrid.num_layers
        return list(reversed(range(n))), [float(i) for i in range(n)]
    monkeypatch.setattr(order_cache, "sensitivity_order", measure)
    first = order_cache.cached_order(h, None, 4)
    assert order_cache.cached_order(h, None, 4) == first and len(calls) == 1  # read back, not measured
    (tmp_path / "order" / f"{h.fingerprint}-4.json").write_text(content)
    assert order_cache.cached_order(h, None, 4) == first and len(calls) == 2
    assert order_cache.cached_order(h, None, 4) == first and len(calls) == 2  # the rewrite is readable


def test_an_entropy_order_on_a_corpus_of_short_documents_is_a_clear_error(monkeypatch):
    """calibration_prompts found no document long enough and the mean over no prompts was None / 0."""
    import dsla_model.corpus as corpus
    from dsla_model.sensitivity import sensitivity_order

    monkeypatch.setattr(corpus, "documents", lambda split, root=None: ("short text " * 20,) * 50)
    with pytest.raises(ValueError, match="long enough"):
        sensitivity_order(tiny_hybrid(), tokenizer=None)
