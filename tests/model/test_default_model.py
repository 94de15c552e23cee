"""Integration on the real default model (SmolLM2-135M-Instruct)."""
import json

import pytest
import torch

from deploy.cli import main as cli
from dsla_model.hybrid import HybridModel
from tests.conftest import skip_without_default_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _needs_the_default_model():
    skip_without_default_model()  # every test here loads it (some through the CLI)


def _run_cli(capsys, *argv):
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_cache_equals_no_cache_with_layers_0_14_29(capsys):
    args = ["generate", "--prompt", "The Python tutorial explains", "--dsla-layers", "0,14,29",
            "--max-tokens", "64", "--temperature", "0", "--json"]
    code, out, _ = _run_cli(capsys, *args)
    assert code == 0
    cached = json.loads(out)
    code, out, _ = _run_cli(capsys, *args, "--no-cache")
    assert code == 0
    reference = json.loads(out)
    assert cached["dsla_layers"] == [0, 14, 29]
    assert len(cached["token_ids"]) == 64
    assert cached["token_ids"] == reference["token_ids"]
    assert cached["text"] == reference["text"]


def test_revert_all_gives_untouched_logits(default_model):
    model, tok = default_model
    ids = torch.tensor([tok("A list is a mutable sequence", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        h = HybridModel(model)
        try:
            for i in (0, 7, 14, 29):
                h.convert(i)
            assert not torch.allclose(h(ids), before)
            h.set_dsla_layers([])
            assert torch.equal(h(ids), before)
        finally:
            # give the shared fixture back its plain attention modules
            for layer in h.decoder_layers:
                layer.self_attn = layer.self_attn.teacher


def test_order_is_a_stable_permutation(capsys):
    from dsla_model import corpus

    try:  # the entropy order reads prompts from the corpus (CI installs it; the GPU machine has none)
        corpus.documents("validation")
    except corpus.CorpusMissingError:
        pytest.skip("python3.11-doc not installed")
    code, out, _ = _run_cli(capsys, "order", "--method", "entropy", "--num-prompts", "4", "--json")
    assert code == 0
    first = json.loads(out)
    assert sorted(first["order"]) == list(range(30))
    assert len(first["entropy"]) == 30 and all(e > 0 for e in first["entropy"])
    e = first["entropy"]
    assert all(e[a] <= e[b] for a, b in zip(first["order"], first["order"][1:]))
    code, out, _ = _run_cli(capsys, "order", "--method", "entropy", "--num-prompts", "4", "--json")
    assert json.loads(out)["order"] == first["order"]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--dsla-layers", "0,30"], "out of range"),
    (["generate", "--prompt", "x", "--dsla-layers", "a,b"], "comma-separated"),
    (["generate", "--prompt", "x", "--conversion", "1.5"], "must be in [0, 1]"),
    (["generate", "--prompt", "x", "--conversion", "0.5", "--dsla-layers", "1"], "not both"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--prompt", "x", "--model", "/nonexistent/dir"], "cannot load model"),
    (["order", "--num-prompts", "0"], "--num-prompts"),
])
def test_bad_arguments_exit_non_zero_with_a_message(capsys, argv, message):
    code, _, err = _run_cli(capsys, *argv)
    assert code == 2
    assert message in err


def test_an_unwritable_cache_is_a_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """The dequantized copy could not be saved (a read-only home, a full disk): a traceback from
    every CLI, and a half-written temporary directory left in the cache."""
    import types

    import transformers

    from dsla_model import loading
    from tests.conftest import tiny_model

    root = tmp_path / "cache"
    monkeypatch.setenv("DSLA_SERVE_CACHE", str(root))
    monkeypatch.setattr(loading, "_default_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: tiny_model())
    tok = types.SimpleNamespace(save_pretrained=lambda path: (_ for _ in ()).throw(OSError(28, "No space left")))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **kw: tok)
    with pytest.raises(loading.ModelNotFoundError, match="cannot cache the default model"):
        loading.default_model_dir()
    models = root / "models"
    assert not models.exists() or not any(p.name.startswith(loading.DEFAULT_MODEL_NAME) for p in models.iterdir())
