"""`dsla-serve generate` with several prompts runs them as one batch; --no-cache is the reference."""
import json

import pytest

from deploy.cli import main
from tests.conftest import skip_without_default_model


@pytest.mark.slow
def test_cli_batch_equals_per_prompt_reference(capsys):
    skip_without_default_model()
    argv = ["generate", "--prompt", "The Python tutorial explains", "--prompt", "Once upon a time",
            "--prompt", "def add(a, b):", "--dsla-layers", "0,14,29", "--max-tokens", "8", "--json"]
    outs = {}
    for extra in ([], ["--no-cache"]):
        assert main(argv + extra) == 0
        outs[bool(extra)] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(outs[False]) == 3
    for a, b in zip(outs[False], outs[True]):
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]


def _tiny_dir(tmp_path, positions):
    from transformers import AutoTokenizer

    from dsla_model.loading import resolve_model
    from tests.conftest import tiny_model

    skip_without_default_model()
    tok = AutoTokenizer.from_pretrained(resolve_model("default"))
    model = tiny_model(layers=2, vocab=len(tok), seed=0)
    model.config.max_position_embeddings = positions
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


def test_generate_takes_prompts_past_8192_tokens_where_the_model_has_the_positions(tmp_path, capsys):
    """The engine path capped sequences at the engine's default 8192 tokens while --no-cache
    (and the model) took them: one path refused what the other answered."""
    d = _tiny_dir(tmp_path, 16384)
    argv = ["generate", "--model", d, "--prompt", "hello world " * 4600, "--max-tokens", "2", "--json"]
    outs = []
    for extra in ([], ["--no-cache"]):
        assert main(argv + extra) == 0, capsys.readouterr().err
        outs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 2


def test_generate_refuses_bad_prompts_and_broken_models_with_one_line(tmp_path, capsys):
    d = _tiny_dir(tmp_path / "ok", 512)
    assert main(["generate", "--model", d, "--prompt", "caf\udce9", "--max-tokens", "2"]) == 2  # a Latin-1 terminal
    assert "not valid UTF-8" in capsys.readouterr().err
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes()[:1000])
    assert main(["generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "Traceback" not in err
