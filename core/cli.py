"""The ``outrider`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from importlib import resources
from typing import Sequence

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

    try:
        if path is None:
            text = resources.files("outrider").joinpath("default_config.yaml").read_text()
            return load_config_text(text, registry, source=DEFAULT_CONFIG_NAME), DEFAULT_CONFIG_NAME
        return load_config(path, registry), path
    except ConfigInvalid as exc:
        count = len(exc.errors)
        print(str(exc), file=sys.stderr)
        print(f"outrider: {count} error{'s' if count != 1 else ''} in {path or DEFAULT_CONFIG_NAME}; nothing started", file=sys.stderr)
        raise SystemExit(1) from exc
    except OSError as exc:
        print(f"outrider: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from exc


def cmd_run(args: argparse.Namespace) -> int:
    from .server import Server, StartupError

    _setup_logging(args.log_level)
    registry = _registry_or_exit()
    config, source = _load(args.config, registry)
    if registry.plugin_manager is not None:
        registry.plugin_manager.hook.outrider_config_loaded(config=config)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        uvloop = None
    server = Server(config, registry, config_source=source)
    try:
        if uvloop is not None and not args.no_uvloop:
            uvloop.run(server.run())
        else:
            asyncio.run(server.run())
    except StartupError as exc:
        logging.getLogger("outrider").error("%s", exc)
        print(f"outrider: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        pass
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
    rows = [
        (e.category, e.name, e.status, f"{e.distribution} {e.version}".strip(), e.description)
        for e in registry.all()
    ]
    if args.json:
        print(json.dumps([dict(zip(("category", "name", "status", "distribution", "description"), r)) for r in rows], indent=2))
        return 0
    header = ("CATEGORY", "NAME", "STATUS", "DISTRIBUTION")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(row[i]).ljust(widths[i]) for i in range(4)).rstrip())
    return 0


def cmd_extensions_show(args: argparse.Namespace) -> int:
    registry = _registry_or_exit()
    found = registry.find(args.name)
    if not found:
        all_names = sorted({e.name for e in registry.all()})
        import difflib

        close = difflib.get_close_matches(args.name, all_names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"outrider: no extension named {args.name!r}{hint}; see `outrider extensions list`", file=sys.stderr)
        return 1
    for ext in found:
        print(f"{ext.category}/{ext.name}  ({ext.status}, {ext.distribution} {ext.version})".rstrip())
        print(f"  {ext.description}")
        print(f"  security posture: {ext.security_posture}")
        if ext.listener_protocol:
            print(f"  listener protocol: {ext.listener_protocol}:")
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
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy (the embedded default config when no -c is given)")
    run.add_argument("-c", "--config", help="the YAML configuration file")
    run.add_argument("-l", "--log-level", default=os.environ.get("OUTRIDER_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error", "critical"])
    run.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    run.set_defaults(func=cmd_run)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
