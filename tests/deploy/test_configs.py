"""cluster.yaml passes Ray's own cluster-config validation; the Serve configs pass Serve's
schema and build a valid AppConfig; the CLI parses and refuses bad configs."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from deploy.config import AppConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # raises on any schema error
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e" in setup  # installs this project
    assert any("serve deploy deploy/serve_config_gpu.yaml" in c for c in config["head_start_ray_commands"])


def test_cluster_yaml_with_a_typo_is_refused():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["max_wrokers"] = 3
    with pytest.raises(Exception):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config_gpu.yaml"])
def test_serve_configs_pass_serve_schema(name):
    from ray.serve.schema import ServeDeploySchema

    path = ROOT / "deploy" / name
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.applications[0].import_path == "deploy.app:app_builder"
    cfg = load_config(path)
    assert isinstance(cfg, AppConfig) and cfg.model == "default"


def test_gpu_config_asks_for_gpus_and_autoscaling():
    from deploy.app import ingress_options, llm_options

    cfg = load_config(ROOT / "deploy" / "serve_config_gpu.yaml")
    opts = llm_options(cfg)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert ingress_options(cfg)["backpressure_config"].retry_after_s >= 1



def test_state_dtype_reaches_the_engine_config_and_is_checked():
    from dsla_model.engine import EngineConfig

    cfg = load_config(ROOT / "deploy" / "serve_config_gpu.yaml", {"engine.state_dtype": "bfloat16"})
    assert cfg.engine.engine_config().state_dtype == "bfloat16"
    assert isinstance(cfg.engine.engine_config(), EngineConfig)
    assert load_config(ROOT / "deploy" / "serve_config_gpu.yaml").engine.state_dtype == "bfloat16-recency"
    assert load_config(ROOT / "deploy" / "serve_config.yaml").engine.state_dtype == "float32"
    with pytest.raises(ValueError, match="state_dtype"):
        load_config(ROOT / "deploy" / "serve_config.yaml", {"engine.state_dtype": "float16"})


def test_overrides_and_refusals(tmp_path):
    cfg = load_config(ROOT / "deploy" / "serve_config.yaml", {"replica.num_replicas": 3, "engine.max_running": "8"})
    assert cfg.replica.num_replicas == 3 and cfg.engine.max_running == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: default\nreplica: {num_gpu: 1}\n")  # typo: refused, not ignored
    with pytest.raises(ValueError):
        load_config(bad)


def test_cli_run_is_registered_and_refuses_bad_config(tmp_path, capsys):
    from deploy.cli import build_parser, main

    args = build_parser().parse_args(["run", "--config", "x.yaml", "--host", "127.0.0.1", "--port", "8001"])
    assert args.command == "run" and args.port == 8001
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: {max_ratio: 3}\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", "--set", "replica.num_gpus=-1"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    "model: default\nengine: {max_running: 8\n",  # not YAML
    "applications: []\n",  # a Serve config without an application
    "- model: default\n",  # a list, not a mapping
])
def test_cli_run_refuses_unreadable_config_files_without_a_traceback(tmp_path, capsys, text):
    from deploy.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["run", "--config", str(bad)]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_run_refuses_a_directory_and_bad_set_values_without_a_traceback(tmp_path, capsys):
    from deploy.cli import main

    assert main(["run", "--config", str(tmp_path)]) == 2
    assert main(["run", "--set", "engine.max_running=[1,"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_set_into_an_empty_or_scalar_section(tmp_path, capsys):
    from deploy.cli import main

    empty = tmp_path / "empty_section.yaml"
    empty.write_text("model: default\nengine:\n  # max_running: 8\n")
    assert load_config(empty, {"engine.max_running": 8}).engine.max_running == 8
    assert main(["run", "--config", str(empty), "--set", "engine.max_running=-1"]) == 2
    assert main(["run", "--set", "model.name=x"]) == 2
    assert "error" in capsys.readouterr().err


def test_distill_settings_are_checked_before_any_worker_starts():
    """A worker_kwargs typo used to pass validation and fail in every restarted actor's
    constructor; a second worker on one store redid every layer of the chain."""
    path = ROOT / "deploy" / "serve_config.yaml"
    cfg = load_config(path, {"distill.num_workers": 1, "distill.worker_kwargs": {"tokens_per_layer": 4096}})
    assert cfg.distill.worker_kwargs == {"tokens_per_layer": 4096}
    with pytest.raises(ValueError, match="tokens_per_leyer"):
        load_config(path, {"distill.worker_kwargs": {"tokens_per_leyer": 4096}})
    with pytest.raises(ValueError, match="one worker per layer store"):
        load_config(path, {"distill.num_workers": 2})


@pytest.mark.parametrize("data, field", [
    ({"replica": {"dtype": "float99"}}, "replica.dtype"),  # getattr(torch, ...) failed in every replica
    ({"replica": {"dtype": "Tensor"}}, "replica.dtype"),
    ({"replica": {"retry_after_s": float("inf")}}, "replica.retry_after_s"),  # math.ceil(inf) in the ingress
    ({"controller": {"poll_interval_s": float("nan")}}, "controller.poll_interval_s"),
    ({"controller": {"policy": {"cooldown_s": float("inf")}}}, "controller.policy.cooldown_s"),
    ({"engine": {"max_running": 64, "max_batched_tokens": 32}}, "max_batched_tokens must be >= max_running"),
    ({"controller": {"poll_interval_s": 1.0, "report_timeout_s": 0.1}}, "at least twice poll_interval_s"),
])
def test_values_that_would_fail_inside_an_actor_are_refused_up_front(data, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        AppConfig.model_validate(data)


def test_a_section_named_again_by_a_serve_configs_args_keeps_the_nested_files_other_keys(tmp_path):
    """`args: {config: base.yaml, engine: {use_cuda_graphs: false}}` replaced base.yaml's whole engine
    section: its max_running 8 and max_batched_tokens 256 silently became the defaults."""
    (tmp_path / "base.yaml").write_text("engine:\n  max_running: 8\n  max_batched_tokens: 256\n")
    (tmp_path / "serve.yaml").write_text(
        "applications:\n  - import_path: deploy.app:app_builder\n    args:\n      config: base.yaml\n"
        "      engine:\n        use_cuda_graphs: false\n")
    cfg = load_config(tmp_path / "serve.yaml")
    assert not cfg.engine.use_cuda_graphs and cfg.engine.max_running == 8 and cfg.engine.max_batched_tokens == 256
    assert load_config(tmp_path / "serve.yaml", {"engine": {"max_running": 4}}).engine.max_batched_tokens == 256
