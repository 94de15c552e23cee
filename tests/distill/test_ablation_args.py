"""`python -m distill_workers.ablation` refuses bad arguments before distilling (it checked them
only after every layer had been distilled, hours on a CPU, and then printed a traceback)."""
from __future__ import annotations

import pytest

from distill_workers import ablation


def test_bad_gate_ranks_are_refused_at_once(capsys):
    with pytest.raises(SystemExit) as e:
        ablation.main(["--gate-ranks", "4,x"])
    assert e.value.code == 2 and "--gate-ranks" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(None, "unknown order"), ('{"order": [0, 0, 1]}', "order")])
def test_a_bad_order_file_is_one_line_before_any_distillation(tmp_path, monkeypatch, capsys, content, message):
    import dsla_model.loading as loading
    import dsla_model.order_cache as order_cache
    from tests.conftest import tiny_model

    monkeypatch.setattr(loading, "load_model", lambda name, **kw: (tiny_model(layers=3), None, "tiny"))
    monkeypatch.setattr(order_cache, "cached_order", lambda *a, **kw: pytest.fail("measured an order first"))
    monkeypatch.setattr(ablation, "capture_all_layers", lambda *a, **kw: pytest.fail("distilled first"))
    path = tmp_path / "order.json"
    if content is not None:
        path.write_text(content)
    assert ablation.main(["--order-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablation: error: ") and message in err and err.count("\n") == 1, err
