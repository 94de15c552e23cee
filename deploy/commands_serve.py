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
    except (ValidationError, ValueError) as e:
        raise CLIError(f"invalid config: {e}") from None


def cmd_run(args) -> int:
    cfg = _config(args)
    import ray
    from ray import serve

    from deploy.app import build_app

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    init = {"address": args.address} if args.address else {
        "include_dashboard": not args.no_dashboard, "dashboard_host": "127.0.0.1"}
    if args.metrics_port and not args.address:
        init["_metrics_export_port"] = args.metrics_port
    # `docker stop`, systemd and CI send SIGTERM: shut Serve and Ray down as on Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    info = ray.init(**init)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"deploying {cfg.model} (store: {cfg.store_path() or 'none'}) ...", flush=True)
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        base = f"http://{args.host}:{args.port}"
        dashboard = getattr(info, "dashboard_url", None)
        metrics_port = args.metrics_port or ray.nodes()[0].get("MetricsExportPort")
        print(f"serving the OpenAI API at {base}/v1  (status: {base}/status, health: {base}/health)")
        if dashboard:
            print(f"Ray dashboard: http://{dashboard}")
        print(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def add_parsers(sub):
    p = sub.add_parser("run", help="serve the OpenAI API with adaptive DSLA conversion (Ray Serve)")
    p.add_argument("--config", default=None, help="YAML: AppConfig fields or a Serve config (deploy/serve_config.yaml)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--layers-dir", default=None, help="override the config's layer store")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, dotted (e.g. replica.num_gpus=1); may be repeated")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus metrics port (local Ray)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    p.set_defaults(handler=cmd_run)
