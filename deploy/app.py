"""Application builders: one AppConfig -> the Serve application (ingress, LLM replicas,
conversion controller).

`build_app(config)` is the Python entry point; `app_builder(args)` is what
`serve run` / `serve deploy` import (deploy/serve_config.yaml), taking either the
config fields themselves or `config: FILE` plus dotted overrides.
"""
from __future__ import annotations

from ray.serve.config import BackpressureConfig

from deploy.config import AppConfig, load_config
from deploy.controller import ConversionController
from deploy.ingress import OpenAIIngress
from deploy.replica import LLMReplica


def llm_options(cfg: AppConfig) -> dict:
    r = cfg.replica
    opts = dict(ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
                max_ongoing_requests=r.max_ongoing_requests, max_queued_requests=r.max_queued_requests,
                health_check_period_s=r.health_check_period_s)
    if r.autoscaling is not None:
        a = r.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(1, a.min_replicas),
                                      "target_ongoing_requests": a.target_ongoing_requests,
                                      "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    else:
        opts["num_replicas"] = r.num_replicas
    return opts


def ingress_options(cfg: AppConfig) -> dict:
    i = cfg.ingress
    # Requests beyond the ingress queue are refused by Serve's proxy itself, with a retry hint.
    return dict(num_replicas=i.num_replicas, ray_actor_options={"num_cpus": i.num_cpus},
                max_ongoing_requests=i.max_ongoing_requests, max_queued_requests=i.max_queued_requests,
                backpressure_config=BackpressureConfig(status_code=503, retry_after_s=i.retry_after_s))


def num_layers(cfg: AppConfig) -> int:
    from transformers import AutoConfig

    from dsla_model.loading import resolve_model

    return AutoConfig.from_pretrained(resolve_model(cfg.model)).num_hidden_layers


def build_app(config: AppConfig | dict | None = None):
    cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config or {})
    data = cfg.model_dump()  # plain data travels to the actors; each validates it again
    # no access log for the controller: every replica reports to it twice a second
    controller = ConversionController.options(ray_actor_options={"num_cpus": cfg.controller.num_cpus},
                                              logging_config={"enable_access_log": False}).bind(data, num_layers(cfg))
    llm = LLMReplica.options(**llm_options(cfg)).bind(data, controller)
    return OpenAIIngress.options(**ingress_options(cfg)).bind(data, llm, controller)


def app_builder(args: dict):
    """`serve run deploy.app:app_builder config=my.yaml engine.max_running=8` or the YAML's args."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_app(load_config(path, overrides=args))
