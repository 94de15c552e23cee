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
