"""`dsla-serve run`: start (or join) Ray, deploy the application, serve until Ctrl-C."""
from __future__ import annotations

import signal
import sys
import time

from deploy.cli import CLIError

APP_NAME = "dsla"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _config(args):
    from pydantic import ValidationError

    from deploy.config import load_config

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set takes KEY=VALUE, got {item!r}")
        import yaml

        try:
            overrides[key] = yaml.safe_load(value)  # numbers, booleans and lists as YAML reads them
        except yaml.YAMLError as e:
            raise CLIError(f"--set {item!r}: the value is not valid YAML ({e.problem or e})") from None
    if args.model:
        overrides["model"] = args.model
    if args.layers_dir:
        overrides["layers_dir"] = args.layers_dir
    try:
        return load_config(args.config, overrides)
    except OSError as e:  # missing, a directory, unreadable
        raise CLIError(str(e)) from None
    except ValidationError as e:  # one line: each problem as "where: what"
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise CLIError(f"invalid config: {problems}") from None
    except ValueError as e:
        raise CLIError(f"invalid config: {e}") from None


def _check_model(cfg):
    """Resolve the model before Ray starts: `build_app` reads its config in this process anyway,
    and a bad --model then fails with one line instead of a traceback from inside a started Ray."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from dsla_model.loading import ModelNotFoundError, resolve_model

    try:
        path = resolve_model(cfg.model)
        mc = AutoConfig.from_pretrained(path)
        _check_files(path)
    except ModelNotFoundError as e:  # names the model already: prefixed, it said it twice
        raise CLIError(str(e)) from None
    except (OSError, ValueError, SafetensorError) as e:
        raise CLIError(f"cannot load model {cfg.model!r}: {e}") from None
    _check_cache_budget(cfg, mc)
    _check_store(cfg)


def _check_files(path):
    """What every replica and the ingress read besides the config: the tokenizer and each weight
    file's header (a truncated file failed every replica after Ray had started)."""
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(path)
    if Path(path).is_dir():
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), "pt"):
                pass


def _check_store(cfg):
    """A layers_dir that is not a store serves nothing but attention, silently, unless a distill
    worker is there to create it."""
    from pathlib import Path

    if cfg.layers_dir and cfg.distill.num_workers == 0 and not (Path(cfg.store_path()) / "manifest.json").exists():
        raise CLIError(f"--layers-dir {cfg.layers_dir}: not a layer store (no manifest.json), and no distill worker "
                       "would create one (distill.num_workers is 0)")


def _check_cache_budget(cfg, mc):
    """A cache budget too small for two of the model's state groups (model config `mc`) fails every
    replica's start."""
    budget = cfg.engine.cache_memory_bytes
    if budget is None:
        return
    from dsla_model.engine.cache_pool import pool_layout
    from dsla_model.engine.config import STATE_FORMATS
    from dsla_model.loading import attention_dims

    need = pool_layout(*attention_dims(mc), cfg.model_dtype(), cfg.engine.engine_config().block_size,
                       STATE_FORMATS[cfg.engine.state_dtype])["min_budget_bytes"]
    if budget < need:
        raise CLIError(f"engine.cache_memory_bytes is {budget}; {cfg.model!r} needs at least {need} "
                       f"(two of its state groups)")


def _check_free(flag, host, port):
    """A port another process listens on: one line now, instead of a traceback (or a 40 s startup
    timeout, for the metrics port) after Ray has started."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {port}: cannot listen on {host or '*'}:{port}: {e.strerror or e}") from None


def cmd_run(args) -> int:
    from deploy.config import serve_http_options

    cfg = _config(args)
    # a Serve config's http_options, unless --host / --port say otherwise
    http = serve_http_options(args.config)
    args.host = args.host or str(http.get("host") or "127.0.0.1")
    args.port = args.port if args.port is not None else http.get("port", 8000)
    if not isinstance(args.port, int) or not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:  # 0: Ray picks one
        raise CLIError(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    _check_model(cfg)
    if not args.address:  # a cluster's Serve may hold the port already (and it is not this machine's)
        _check_free("--port", args.host, args.port)
        if args.metrics_port:
            _check_free("--metrics-port", "", args.metrics_port)
    import ray
    from ray import serve

    from deploy.app import build_app

    # "local": a Ray of our own even where `ray start` runs one (joining it silently ignored
    # --port / --no-dashboard / --metrics-port, and the shutdown removed that cluster's other apps)
    init = {"address": args.address} if args.address else {
        "address": "local", "include_dashboard": not args.no_dashboard, "dashboard_host": "127.0.0.1"}
    if args.metrics_port and not args.address:
        init["_metrics_export_port"] = args.metrics_port
    info = ray.init(**init)
    # `docker stop`, systemd and CI send SIGTERM: shut Serve and Ray down as on Ctrl-C. Set after
    # ray.init, which installs its own SIGTERM handler (sys.exit, and the process then aborted in
    # the middle of the shutdown, leaving Ray's agents running).
    signal.signal(signal.SIGTERM, _interrupt)
    deployed = False
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"deploying {cfg.model} (store: {cfg.store_path() or 'none'}) ...", flush=True)
        deployed = True  # from here on there may be something of ours to remove
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        base = f"http://{args.host}:{args.port}"
        dashboard = getattr(info, "dashboard_url", None)
        node = ray.nodes()[0]
        if args.address:  # a cluster's nodes export on the port they were started with
            metrics = f"http://{node.get('NodeManagerAddress')}:{node.get('MetricsExportPort')}/metrics (each node)"
        else:
            metrics = f"http://127.0.0.1:{args.metrics_port or node.get('MetricsExportPort')}/metrics"
        print(f"serving the OpenAI API at {base}/v1  (status: {base}/status, health: {base}/health)")
        if dashboard:
            print(f"Ray dashboard: http://{dashboard}")
        print(f"Prometheus metrics: {metrics}  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
        return 0
    finally:
        try:
            if args.address:  # a shared cluster: only what this command deployed
                if deployed:
                    try:
                        serve.delete(APP_NAME)
                    except Exception as e:  # noqa: BLE001 - must not hide the error that got us here
                        print(f"could not remove {APP_NAME}: {e}", file=sys.stderr)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()


def add_parsers(sub):
    p = sub.add_parser("run", help="serve the OpenAI API with adaptive DSLA conversion (Ray Serve)")
    p.add_argument("--config", default=None, help="YAML: AppConfig fields or a Serve config (deploy/serve_config.yaml)")
    p.add_argument("--host", default=None, help="default: the Serve config's http_options, else 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: the Serve config's http_options, else 8000")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--layers-dir", default=None, help="override the config's layer store")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, dotted (e.g. replica.num_gpus=1); may be repeated")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus metrics port (local Ray)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    p.set_defaults(handler=cmd_run)
