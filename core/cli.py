"""The ``outrider`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from importlib import resources
from typing import Any, Sequence

from . import __version__
from .registry import Registry, RegistryError, load_registry

DEFAULT_CONFIG_NAME = "<embedded default>"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
        stream=sys.stderr,
    )


def _registry_or_exit() -> Registry:
    try:
        return load_registry()
    except RegistryError as exc:
        print(f"outrider: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


def _load(path: str | None, registry: Registry) -> tuple[dict, str]:
    from .config import ConfigInvalid, load_config, load_config_text
    from .server import UNSUPPORTED

    try:
        if path is None:
            text = resources.files("outrider").joinpath("default_config.yaml").read_text()
            return load_config_text(text, registry, source=DEFAULT_CONFIG_NAME, unsupported=UNSUPPORTED), DEFAULT_CONFIG_NAME
        return load_config(path, registry, unsupported=UNSUPPORTED), path
    except ConfigInvalid as exc:
        count = len(exc.errors)
        print(str(exc), file=sys.stderr)
        print(f"outrider: {count} error{'s' if count != 1 else ''} in {path or DEFAULT_CONFIG_NAME}; nothing started", file=sys.stderr)
        raise SystemExit(1) from exc
    except OSError as exc:
        print(f"outrider: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from exc


def _run_loop(main: Any, no_uvloop: bool) -> Any:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        uvloop = None
    if uvloop is not None and not no_uvloop:
        return uvloop.run(main)
    return asyncio.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    from .server import Server, StartupError
    from .workers import worker_count

    _setup_logging(args.log_level)
    registry = _registry_or_exit()
    config, source = _load(args.config, registry)
    if registry.plugin_manager is not None:
        registry.plugin_manager.hook.outrider_config_loaded(config=config)
    if worker_count(config.get("workers")) > 1:
        worker_args = ["--log-level", args.log_level] + (["--no-uvloop"] if args.no_uvloop else [])
        server = Server(config, registry, config_source=source, role="supervisor", worker_args=worker_args)
    else:
        server = Server(config, registry, config_source=source)
    try:
        _run_loop(server.run(), args.no_uvloop)
    except StartupError as exc:
        logging.getLogger("outrider").error("%s", exc)
        print(f"outrider: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A worker process, started by ``outrider run`` (see workers.py)."""
    from .workers import serve_worker

    # Until the loop takes SIGUSR1 over, a log rotation must not kill a
    # worker that is still starting (the default action ends the process).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _setup_logging(args.log_level)
    registry = _registry_or_exit()
    try:
        return int(_run_loop(serve_worker(args.control_fd, args.supervisor_pid, registry), args.no_uvloop))
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        return 0


def cmd_validate(args: argparse.Namespace) -> int:
    registry = _registry_or_exit()
    config, source = _load(args.config, registry)
    from .server import Server, StartupError

    # Build every object (no sockets are opened) so that an extension's own
    # refusal of its config is caught here too.
    try:
        Server(config, registry, config_source=source).build_or_raise()
    except StartupError as exc:
        print(f"{source}: {exc}", file=sys.stderr)
        return 1
    listeners = len(config.get("listeners", []))
    clusters = len(config.get("clusters", []))
    print(f"{source}: OK ({listeners} listener{'s' if listeners != 1 else ''}, {clusters} cluster{'s' if clusters != 1 else ''})")
    return 0


def cmd_extensions_list(args: argparse.Namespace) -> int:
    registry = _registry_or_exit()
    exts = list(registry.all())
    if args.json:
        print(json.dumps(
            [
                {
                    "category": e.category,
                    "name": e.name,
                    "status": e.status,
                    "distribution": e.distribution,
                    "version": e.version,
                    "security_posture": e.security_posture,
                    "description": e.description,
                }
                for e in exts
            ],
            indent=2,
        ))
        return 0
    header = ("CATEGORY", "NAME", "STATUS", "DISTRIBUTION", "VERSION")
    rows = [header, *((e.category, e.name, e.status, e.distribution, e.version) for e in exts)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_extensions_show(args: argparse.Namespace) -> int:
    registry = _registry_or_exit()
    found = registry.find(args.name)
    if not found:
        import difflib

        # Suggest in the form that was asked for: NAME, or CATEGORY/NAME.
        # A right name in the wrong category is the likeliest mistake.
        qualified = "/" in args.name
        close = [e.key for e in registry.find(args.name.rpartition("/")[2])][:1] if qualified else []
        if not close:
            candidates = sorted({e.key if qualified else e.name for e in registry.all()})
            close = difflib.get_close_matches(args.name, candidates, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"outrider: no extension named {args.name!r}{hint}; see `outrider extensions list`", file=sys.stderr)
        return 1
    for ext in found:
        print(f"{ext.category}/{ext.name}  ({ext.status}, {ext.distribution} {ext.version})".rstrip())
        print(f"  {ext.description}")
        print(f"  security posture: {ext.security_posture}")
        if ext.listener_protocol:
            print(f"  listener protocol: `{ext.listener_protocol}:` blocks in a listener")
        print("\nConfig schema:")
        print(json.dumps(ext.schema or {}, indent=2))
        readme = ext.readme()
        if readme:
            print("\nREADME:\n")
            print(readme)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrider", description="A plugin-first L4/L7 proxy.")
    parser.add_argument("--version", action="version", version=f"outrider {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,validate,extensions}")

    run = sub.add_parser("run", help="run the proxy (the embedded default config when no -c is given)")
    run.add_argument("-c", "--config", help="the YAML configuration file")
    run.add_argument("-l", "--log-level", default=os.environ.get("OUTRIDER_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error", "critical"])
    run.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    run.set_defaults(func=cmd_run)

    # Started by `run` with `workers: N`, never by hand (no help line).
    worker = sub.add_parser("worker")
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--supervisor-pid", type=int, required=True)
    worker.add_argument("-l", "--log-level", default="info")
    worker.add_argument("--no-uvloop", action="store_true")
    worker.set_defaults(func=cmd_worker)

    validate = sub.add_parser("validate", help="check a configuration file without starting anything")
    validate.add_argument("config", help="the YAML configuration file")
    validate.set_defaults(func=cmd_validate)

    ext = sub.add_parser("extensions", help="list or describe installed extensions")
    ext_sub = ext.add_subparsers(dest="ext_command", required=True)
    ext_list = ext_sub.add_parser("list", help="every installed extension")
    ext_list.add_argument("--json", action="store_true")
    ext_list.set_defaults(func=cmd_extensions_list)
    ext_show = ext_sub.add_parser("show", help="one extension's description, schema and README")
    ext_show.add_argument("name", help="NAME or CATEGORY/NAME")
    ext_show.set_defaults(func=cmd_extensions_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int | str | None:
    try:
        try:
            args = build_parser().parse_args(argv)
            code: int | str | None = args.func(args)
        except SystemExit as exc:  # --help, --version, usage errors, a refused config
            code = exc.code
        # Flush here, not at interpreter exit, so that a closed pipe is caught below.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`outrider extensions show router | head -1`):
        # stop quietly, as a tool killed by SIGPIPE would, with no traceback and
        # no second error when Python flushes stdout on its way out.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + getattr(signal, "SIGPIPE", 13)
    except KeyboardInterrupt:
        # Ctrl-C before a running server took SIGINT over (it then stops
        # gracefully and exits 0): while extensions or the config load.
        return 128 + signal.SIGINT
    return code
