"""Model identity and lookup: the fingerprint layer stores are checked against is the same whether
the model is loaded in float32 (CPU) or bfloat16 (a GPU replica's `dtype: auto`); a --model path
that does not exist is named as such."""
import copy

import torch

from dsla_model.layer_store import LayerStore, shipped_store
from dsla_model.loading import model_fingerprint
from tests.conftest import skip_without_default_model, tiny_model


def test_fingerprint_is_the_same_in_float32_and_bfloat16_and_tells_models_apart():
    a = tiny_model(seed=0)
    assert model_fingerprint(copy.deepcopy(a).to(torch.bfloat16)) == model_fingerprint(a)
    assert model_fingerprint(tiny_model(seed=1)) != model_fingerprint(a)


def test_a_bfloat16_default_model_gets_the_shipped_store():
    # The shipped store was distilled in float32; a GPU replica loads the model in bfloat16. With a
    # dtype-dependent fingerprint every shipped layer was refused there and no layer converted.
    skip_without_default_model()
    from dsla_model.loading import load_model

    model, _, _ = load_model("default", dtype=torch.bfloat16)
    fp = model_fingerprint(model)
    path = shipped_store(fp)
    assert path is not None
    store = LayerStore(path)
    layer = store.published_layers()[0]
    weights = store.load_layer(layer, fp)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_a_missing_model_directory_is_named_as_such(tmp_path):
    import pytest

    from dsla_model.loading import ModelNotFoundError, resolve_model

    for spec in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="no such directory"):
            resolve_model(spec)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id passes


def test_a_model_directory_under_home_given_with_a_tilde(tmp_path, monkeypatch):
    from dsla_model.loading import resolve_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/m") == str(tmp_path / "m")  # `--model=~/m`: the shell leaves the tilde


def test_fingerprint_follows_the_config_fields_that_change_the_computation():
    """Layers distilled under one RoPE or norm epsilon are wrong under another (a user extending the
    context by a larger rope_theta keeps the weights): such a model gets another fingerprint, while
    fields that change nothing computed (max positions, cache flags) keep it."""
    a = tiny_model(seed=0)
    base = model_fingerprint(a)
    for field, value in (("rope_theta", 1e6), ("rms_norm_eps", 1e-3)):
        b = copy.deepcopy(a)
        if field == "rope_theta" and getattr(b.config, "rope_parameters", None):
            b.config.rope_parameters = {**b.config.rope_parameters, "rope_theta": value}
        else:
            setattr(b.config, field, value)
        assert model_fingerprint(b) != base, field
    b = copy.deepcopy(a)
    b.config.max_position_embeddings *= 2
    b.config.use_cache = not b.config.use_cache
    assert model_fingerprint(b) == base
