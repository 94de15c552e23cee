"""bench/engine_prefill.py refuses bad arguments before it builds anything: a chunk below the engines'
max_running or an unknown state format failed inside Engine(), after the model was built and HF's
prefill timed at every length (minutes on a GPU)."""
import sys

import pytest

import bench.engine_prefill as ep


@pytest.mark.parametrize("argv, message", [
    (["--chunks", "2048,8"], "max_batched_tokens must be >= max_running"),
    (["--chunks", "0"], "max_batched_tokens must be >= max_running"),
    (["--state-dtype", "fp16"], "state_dtype must be one of"),
])
def test_bad_arguments_fail_before_the_run(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["engine_prefill.py", *argv])
    monkeypatch.setattr(ep, "run", lambda args: pytest.fail("run() started with bad arguments"))
    monkeypatch.setattr(ep.torch.cuda, "is_available", lambda: True)  # past the CUDA check, as on a GPU machine
    with pytest.raises(SystemExit) as e:
        ep.main()
    assert e.value.code == 2 and message in capsys.readouterr().err
