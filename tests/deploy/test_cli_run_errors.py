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


def test_config_error_names_the_field(no_ray, capsys):
    from deploy.cli import main

    assert main(["run", "--set", "engine.max_runing=3"]) == 2
    assert "engine.max_runing: Extra inputs are not permitted" in capsys.readouterr().err
