"""`dsla-serve run` refuses bad arguments with one line on stderr and exit code 2, before Ray
starts: a bad config (pydantic's multi-line report was printed as is: 4 lines for one typo, 52 for
`--config cluster.yaml`), a model that cannot be loaded (a traceback from inside a started Ray,
exit 1) and an out-of-range --metrics-port (Ray's node startup timed out, with a traceback)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(**kw):
        raise AssertionError("ray.init called: the arguments should have been refused first")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("argv", [
    ["--set", "engine.max_runing=3"],  # a typo
    ["--set", "engine.max_running=0"],  # out of range
    ["--set", "foo=1", "--set", "engine.max_running=0"],  # two problems
    ["--config", str(ROOT / "cluster.yaml")],  # not an AppConfig: many unknown keys
    ["--config", str(ROOT / "README.md")],  # not YAML
    ["--model", "/nonexistent/model/dir"],
    ["--metrics-port", "-5"],
    ["--metrics-port", "70000"],
])
def test_run_refuses_with_one_line_before_ray_starts(no_ray, capsys, argv):
    from deploy.cli import main

    assert main(["run", "--no-dashboard", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsla-serve run: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_a_missing_model_is_named_once(no_ray, capsys):
    """It read "cannot load model '/x': cannot load model '/x': no such directory ..."."""
    from deploy.cli import main

    assert main(["run", "--no-dashboard", "--model", "/nonexistent/model/dir"]) == 2
    err = capsys.readouterr().err
    assert err.count("/nonexistent/model/dir") == 1 and "no such directory" in err, err


def test_config_error_names_the_field(no_ray, capsys):
    from deploy.cli import main

    assert main(["run", "--set", "engine.max_runing=3"]) == 2
    assert "engine.max_runing: Extra inputs are not permitted" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_before_ray_starts(no_ray, capsys):
    """It was a traceback from inside serve.start (exit 1), or for the metrics port a 40 s node
    startup timeout."""
    import socket

    from deploy.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["run", "--no-dashboard", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--port {port}: cannot listen" in err and err.count("\n") == 1


@pytest.mark.parametrize("body,msg", [("applications: [{args: [1]}]", "must be a mapping"),
                                      ("applications: [{args: {config: [1, 2]}}]", "must be a file name"),
                                      ("applications: [{args: {config: self.yaml}}]", "includes itself")])
def test_a_malformed_serve_config_is_one_line(no_ray, capsys, tmp_path, body, msg):
    """A list for args, a non-string or self-including args.config were tracebacks (a recursion error)."""
    from deploy.cli import main

    (tmp_path / "self.yaml").write_text(body)
    assert main(["run", "--no-dashboard", "--config", str(tmp_path / "self.yaml")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err


def test_run_listens_where_the_serve_configs_http_options_say_unless_told(tmp_path):
    """`dsla-serve run --config deploy/serve_config_gpu.yaml` bound 127.0.0.1:8000 whatever the file said."""
    from deploy.config import serve_http_options

    assert serve_http_options(ROOT / "deploy" / "serve_config_gpu.yaml") == {"host": "0.0.0.0", "port": 8000}
    assert serve_http_options(ROOT / "deploy" / "serve_config.yaml") == {"host": "127.0.0.1", "port": 8000}
    (tmp_path / "plain.yaml").write_text("model: default\n")
    assert serve_http_options(tmp_path / "plain.yaml") == {} and serve_http_options(None) == {}


def test_run_starts_a_ray_of_its_own_unless_given_an_address(monkeypatch):
    """Without an address ray.init joined any `ray start` cluster on the machine: --port,
    --no-dashboard and --metrics-port were then ignored, and the shutdown removed its other apps."""
    import socket

    import ray

    from deploy.cli import main

    seen = []

    class Stop(Exception):
        pass

    def record(**kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(ray, "init", record)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(Stop):
        main(["run", "--no-dashboard", "--port", str(port), "--metrics-port", "0"])
    assert seen[-1]["address"] == "local" and seen[-1]["include_dashboard"] is False


def test_a_cache_budget_too_small_for_the_model_is_one_line_before_ray_starts(no_ray, capsys):
    """Every replica's CachePool refused it after its model had loaded, and Serve retried them."""
    from deploy.cli import main

    assert main(["run", "--no-dashboard", "--set", "engine.cache_memory_bytes=4096"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "engine.cache_memory_bytes is 4096" in err and "needs at least" in err, err


def test_a_model_directory_with_broken_weights_is_one_line_before_ray_starts(no_ray, capsys, tmp_path):
    """Only its config.json was read before Ray started: every replica then failed to deploy."""
    import shutil

    from deploy.cli import main
    from dsla_model.loading import resolve_model

    src = Path(resolve_model("default"))
    for f in src.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:1000])
    assert main(["run", "--no-dashboard", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load model" in err, err


def test_a_layers_dir_that_is_not_a_store_is_refused_unless_a_worker_would_create_it(no_ray, capsys, tmp_path):
    from deploy.cli import main

    assert main(["run", "--no-dashboard", "--layers-dir", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a layer store" in err, err


def test_a_reader_that_leaves_the_pipe_ends_the_cli_quietly(monkeypatch):
    """`dsla-serve generate ... | head -c 1` ended in a BrokenPipeError traceback."""
    import argparse
    import os

    from deploy import cli

    def leave(args):
        raise BrokenPipeError(32, "Broken pipe")
    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=leave, command="generate")
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    duped = []
    monkeypatch.setattr(os, "dup2", lambda fd, fd2: duped.append(fd2))
    assert cli.main([]) == 141 and duped
