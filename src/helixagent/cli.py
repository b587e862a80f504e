"""The ``helixagent`` command."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Any, Callable

import yaml

from . import __version__
from .config import DEFAULT_PORT, ConfigError, load_config, masked_dict

log = logging.getLogger("helixagent")

# Subcommands added by feature modules: name -> (configure(subparsers), run(args) -> int)
EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def setup_logging(cfg: Any) -> None:
    from .observability.logs import configure_logging
    configure_logging(cfg.logging)


def app_factory() -> Any:
    """Build the ASGI app from $HELIXAGENT_CONFIG (used by each server worker)."""
    from .app import create_app
    path = os.environ.get("HELIXAGENT_CONFIG") or None
    cfg = load_config(path)
    setup_logging(cfg)
    return create_app(cfg, path or "")  # "": the defaults, re-read (as defaults) by a config reload


def cmd_serve(args: argparse.Namespace) -> int:
    from .memory import disable_huge_pages
    disable_huge_pages()  # before the HTTP client allocates: 8 MB less RSS (memory.py)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"helixagent: {exc}", file=sys.stderr)
        return 2
    from .preflight import refuse
    if refuse(cfg, args.config or os.environ.get("HELIXAGENT_CONFIG") or "<defaults>"):
        return 2
    setup_logging(cfg)
    from . import compiled
    try:
        native = compiled.check()
    except compiled.StaleCompiledModule as exc:
        print(f"helixagent: {exc}", file=sys.stderr)
        return 2
    if native:
        log.info("compiled modules (mypyc): %d of %d", len(native), len(compiled.MODULES))
    host = args.host or cfg.server.host
    port = args.port or cfg.server.port
    if not cfg.auth.master_key and not _is_loopback(host):
        log.warning("no master key is configured (HELIXAGENT_API_KEY): serving on 127.0.0.1 only instead of "
                    "%s. Set HELIXAGENT_API_KEY to serve other hosts.", host)
        host = "127.0.0.1"
    elif not cfg.auth.master_key:
        log.warning("no master key is configured (HELIXAGENT_API_KEY): serving on localhost only, "
                    "without authentication")
    if args.config:
        os.environ["HELIXAGENT_CONFIG"] = os.path.abspath(args.config)
    workers = args.workers or cfg.server.workers
    metrics_dir, own_dir, metrics_srv = _setup_metrics(cfg, host, workers)
    from .api.server import serve
    try:
        # binds the socket first: "listening" is logged only once it is bound and the workers are up
        return serve(cfg.server, host, port, workers, __version__)
    finally:
        if metrics_srv is not None:
            metrics_srv.shutdown()
            metrics_srv.server_close()
        if own_dir and metrics_dir:
            import shutil
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _setup_metrics(cfg: Any, host: str, workers: int) -> tuple[str | None, bool, Any]:
    """Several workers (or a separate metrics port): prometheus_client's multiprocess mode.  The directory
    is $PROMETHEUS_MULTIPROC_DIR if set, else a fresh temporary one; it is emptied before the workers start
    (stale files would be added up) and a temporary one is removed at exit.  Must run before anything
    imports prometheus_client, which picks its value store on import."""
    if not cfg.metrics.enabled or (workers <= 1 and not cfg.metrics.port):
        return None, False, None
    import tempfile
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    own = not path
    if own:
        path = tempfile.mkdtemp(prefix="helixagent-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from .observability.multiproc import prepare_multiprocess_dir
    prepare_multiprocess_dir(path)
    srv = None
    if cfg.metrics.port:
        # the supervising process serves the port, adding up every worker's values
        from .observability.metrics_server import start_multiprocess_metrics_server
        from .observability.stage import METRICS_PORT_SERVED_ENV
        srv = start_multiprocess_metrics_server(path, host, cfg.metrics.port)
        os.environ[METRICS_PORT_SERVED_ENV] = "1"
    return path, own, srv


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"helixagent: {exc}", file=sys.stderr)
        return 2
    from .preflight import check_runtime
    problems = check_runtime(cfg)  # the same checks `serve` refuses to start on
    if problems:
        print(f"helixagent: {args.file}: the gateway cannot start with this configuration:\n"
              + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2
    print(f"# {args.file}: valid")
    print(yaml.safe_dump(masked_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helixagent", description="HelixAgent LLM gateway")
    p.add_argument("--version", action="version", version=f"helixagent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", "-c", help="YAML config file (default: $HELIXAGENT_CONFIG or built-in defaults)")
    s.add_argument("--host", help="bind address (default from config, 127.0.0.1)")
    s.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    s.add_argument("--workers", type=int, help="worker processes (default from config, 1)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    cc = csub.add_parser("check", help="validate a config file and print the effective config, secrets masked")
    cc.add_argument("file")
    cc.set_defaults(func=cmd_config_check)

    from .features import install_commands
    install_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
