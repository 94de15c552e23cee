"""The one config object the whole application is built from.

The same `AppConfig` comes from YAML (`dsla-serve run --config`, or the `args:`
block of a `serve run` / `serve deploy` config) or from Python. Unknown keys are
refused so a typo fails at deploy time instead of being silently ignored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The default model's distilled layers ship with the repo (issue 4).
REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_STORE = REPO_ROOT / "layers"


class _Strict(BaseModel):
    # inf / nan would pass every bound here and fail later inside an actor (math.ceil(inf) in the ingress)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EngineSettings(_Strict):
    """Passed to `dsla_model.engine.EngineConfig` field by field."""
    max_running: int = Field(16, ge=1)
    max_batched_tokens: int = Field(2048, ge=1)
    max_model_len: Optional[int] = Field(None, ge=2)
    cache_memory_bytes: Optional[int] = Field(None, ge=1)
    use_cuda_graphs: bool = True
    state_dtype: str = "float32"

    def engine_config(self):
        """The engine's own config (dsla_model.engine.EngineConfig), field for field."""
        from dsla_model.engine.config import EngineConfig

        return EngineConfig(**self.model_dump())

    @field_validator("state_dtype")
    @classmethod
    def _state_dtype(cls, v):
        from dsla_model.engine.config import check_state_dtype

        return check_state_dtype(v)

    @model_validator(mode="after")
    def _engine_checks(self):
        """The engine's own checks (max_batched_tokens >= max_running, ...), here rather than in
        every replica, after its model has loaded."""
        self.engine_config().validate()
        return self


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of the LLM deployment (replica count follows request rate)."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling: min_replicas > max_replicas")
        return self


class ReplicaSettings(_Strict):
    num_gpus: float = Field(0.0, ge=0)  # 0: CPU replica
    num_cpus: float = Field(1.0, ge=0)
    num_replicas: int = Field(1, ge=1)  # used when autoscaling is None
    autoscaling: Optional[AutoscalingSettings] = None
    # Must exceed engine.max_running so that the engine's own waiting queue (the
    # controller's main load signal) can form; beyond it Serve queues, then rejects.
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)  # -1: unbounded
    retry_after_s: float = Field(1.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    health_check_period_s: float = Field(10.0, gt=0)


class IngressSettings(_Strict):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)
    max_queued_requests: int = Field(1024, ge=-1)
    retry_after_s: float = Field(1.0, ge=0)


class PolicySettings(_Strict):
    """Thresholds of the conversion policy (see deploy/policy.py for how they are used).

    A signal is "high" at or above its *_high value and "low" at or below its
    *_low value; the gap between them is the hysteresis band.
    """
    queue_high: float = Field(4.0, ge=0)  # waiting requests on the busiest replica
    queue_low: float = Field(0.0, ge=0)
    waiting_tokens_high: float = Field(8192, ge=0)  # prompt tokens waiting for prefill
    waiting_tokens_low: float = Field(0, ge=0)
    cache_high: float = Field(0.85, ge=0, le=1)  # fraction of the cache budget in use
    cache_low: float = Field(0.5, ge=0, le=1)
    tpot_high_s: Optional[float] = Field(None, gt=0)  # None: time per token is not a signal
    tpot_low_s: Optional[float] = Field(None, gt=0)
    up_patience: int = Field(2, ge=1)  # consecutive high polls before converting
    down_patience: int = Field(10, ge=1)  # consecutive low polls before reverting
    cooldown_s: float = Field(5.0, ge=0)  # minimum time between two changes
    step_layers: int = Field(2, ge=1)  # layers converted / reverted per decision
    # never convert more than this share; 0.5 because at 0.75 the shipped store's perplexity past 1K
    # tokens is several times the teacher's (bench/results/context_quality.md)
    max_ratio: float = Field(0.5, ge=0, le=1)
    min_layers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _bands(self):
        for name in ("queue", "waiting_tokens", "cache"):
            if getattr(self, f"{name}_low") > getattr(self, f"{name}_high"):
                raise ValueError(f"policy: {name}_low > {name}_high")
        if (self.tpot_high_s is None) != (self.tpot_low_s is None):
            raise ValueError("policy: give both tpot_high_s and tpot_low_s, or neither")
        if self.tpot_high_s is not None and self.tpot_low_s > self.tpot_high_s:
            raise ValueError("policy: tpot_low_s > tpot_high_s")
        return self


class ControllerSettings(_Strict):
    enabled: bool = True  # False: replicas keep `initial_layers`
    poll_interval_s: float = Field(0.5, gt=0)
    report_timeout_s: float = Field(5.0, gt=0)  # a replica silent this long is dropped
    initial_layers: int = Field(0, ge=0)
    num_cpus: float = Field(0.1, ge=0)
    policy: PolicySettings = PolicySettings()

    @model_validator(mode="after")
    def _timeout(self):
        # a replica reports once a poll interval and the controller drops reports older than the
        # timeout: below two intervals it would hear each replica only now and then
        if self.report_timeout_s < 2 * self.poll_interval_s:
            raise ValueError(f"controller: report_timeout_s ({self.report_timeout_s}) must be at least twice "
                             f"poll_interval_s ({self.poll_interval_s})")
        return self


class DistillSettings(_Strict):
    """Background distillation actors (engineer C's DistillWorker)."""
    # 0: no distillation, serve what the store holds. At most 1: layers are distilled as a chain,
    # each on top of the ones before it, so a second worker on the same store would only redo
    # (and republish) the same layers.
    num_workers: int = Field(0, ge=0)
    # defaults sum (with one replica) to under 2 CPUs, so a 2-core laptop can run everything
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    worker_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to DistillWorker

    @field_validator("num_workers")
    @classmethod
    def _one_chain(cls, v):
        if v > 1:
            raise ValueError(f"distill.num_workers is {v}: one worker per layer store (layers are distilled "
                             "as a chain, each on top of the ones before it)")
        return v

    @field_validator("worker_kwargs")
    @classmethod
    def _known_kwargs(cls, v):
        """Refused here rather than by every restarted actor's constructor."""
        import inspect

        from distill_workers.runner import build_distiller
        from distill_workers.worker import DistillWorkerImpl

        known = set(inspect.signature(build_distiller).parameters) | set(
            inspect.signature(DistillWorkerImpl.__init__).parameters)
        known -= {"self", "kwargs", "model", "store", "loaded"}  # set by the application itself
        known -= {k for k in known if k.startswith("_")}  # Ray's own (e.g. _ray_trace_ctx)
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"distill.worker_kwargs: unknown {bad}; known: {sorted(known)}")
        return v


class AppConfig(_Strict):
    model: str = "default"  # 'default', an HF model directory or a hub id
    served_model_name: Optional[str] = None  # the name clients send; default: the model id
    layers_dir: Optional[str] = None  # the layer store; None: the shipped one for 'default'
    store_poll_interval_s: float = Field(2.0, gt=0)  # replicas look for new layers this often
    max_tokens_limit: int = Field(4096, ge=1)  # the most tokens one choice may ask for
    default_max_tokens: int = Field(256, ge=1)  # chat requests without max_tokens
    max_choices: int = Field(8, ge=1)  # prompts x n per request
    engine: EngineSettings = EngineSettings()
    replica: ReplicaSettings = ReplicaSettings()
    ingress: IngressSettings = IngressSettings()
    controller: ControllerSettings = ControllerSettings()
    distill: DistillSettings = DistillSettings()

    def store_path(self) -> Optional[str]:
        if self.layers_dir:
            return str(Path(self.layers_dir).expanduser().resolve())
        if self.model == "default" and SHIPPED_STORE.exists():
            return str(SHIPPED_STORE)
        return None

    def device(self) -> str:
        return "cuda" if self.replica.num_gpus > 0 else "cpu"

    def model_dtype(self):
        """The torch dtype replicas load the model in."""
        import torch

        if self.replica.dtype == "auto":
            return torch.bfloat16 if self.device() == "cuda" else torch.float32
        return getattr(torch, self.replica.dtype)


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, _seen=()) -> AppConfig:
    """AppConfig from a YAML file plus dotted overrides.

    The file is either the config itself or a Serve config (`serve run` / `serve
    deploy`) whose first application's `args` hold it, so one file serves every
    entry point.
    """
    data: dict = {}
    if path is not None:
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:  # a ValueError, so callers report it like any bad config
                raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        if "applications" in data:
            apps = data["applications"]
            if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
                raise ValueError(f"{path}: 'applications' must be a list holding at least one application")
            args = apps[0].get("args") or {}
            if not isinstance(args, dict):
                raise ValueError(f"{path}: applications[0].args must be a mapping")
            data = dict(args)
            nested = data.pop("config", None)
            if nested is not None:
                if not isinstance(nested, str):
                    raise ValueError(f"{path}: args.config must be a file name, got {nested!r}")
                here = Path(path).resolve()
                if here in _seen:
                    raise ValueError(f"{path}: its args.config includes itself")
                return load_config(Path(path).parent / nested, {**data, **(overrides or {})}, (*_seen, here))
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return AppConfig.model_validate(data)


def serve_http_options(path) -> dict:
    """The `http_options` (host, port) of a Serve config file, {} for a plain AppConfig file."""
    if path is None:
        return {}
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError:
            return {}  # load_config reports it
    opts = data.get("http_options") if isinstance(data, dict) else None
    return {k: opts[k] for k in ("host", "port") if k in opts} if isinstance(opts, dict) else {}


def _set_dotted(data: dict, key: str, value):
    *parents, leaf = key.split(".")
    for p in parents:
        child = data.get(p)
        if child is None:  # also a YAML section left empty (`engine:` with its lines commented out)
            child = data[p] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"cannot set {key}: {p} is {child!r}, not a mapping")
        data = child
    if isinstance(value, dict) and isinstance(data.get(leaf), dict):
        # a section given again (a Serve config's args over the file its `config:` names) sets
        # the keys it names and keeps the others
        for k, v in value.items():
            _set_dotted(data[leaf], str(k), v)
    else:
        data[leaf] = value
