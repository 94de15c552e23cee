"""bench/engine_stall.py on a tiny random Llama: chunked prefill gives the long prompt what a step
has left after the running stream's decode, and the stream gets a token in every one of those steps."""
import argparse
import json
import math
import sys

import pytest

import bench.engine_stall as es


def test_the_stream_decodes_in_every_step_of_the_long_prefill(tmp_path):
    args = argparse.Namespace(model="tiny", chunks=[64, 32], prompt_tokens=300, dsla_layers=[1], out=str(tmp_path))
    res = es.run(args)
    for row in res["rows"]:
        assert row["steps"] == math.ceil(300 / (row["max_batched_tokens"] - 1))
        assert row["stream_tokens_meanwhile"] == row["steps"]
        assert 0 < row["longest_gap_s"] <= row["ttft_s"]
    saved = json.loads((tmp_path / "engine_stall.json").read_text())
    assert saved["gpu"] is None and saved["dsla_layers"] == [1] and len(saved["rows"]) == 2
    assert "| 32 |" in (tmp_path / "engine_stall.md").read_text()


@pytest.mark.parametrize("argv, message", [(["--chunks", "8"], "max_batched_tokens must be >= max_running"),
                                           (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1")])
def test_bad_arguments_fail_before_the_model_loads(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["engine_stall.py", *argv])
    monkeypatch.setattr(es, "run", lambda args: pytest.fail("run() started with bad arguments"))
    with pytest.raises(SystemExit) as e:
        es.main()
    assert e.value.code == 2 and message in capsys.readouterr().err
