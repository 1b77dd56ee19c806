"""Validating and normalising a configuration.

:func:`load_config_text` reads the YAML (see :mod:`.loader`), then checks it
in three passes that each add to one list of errors, so that a file with five
mistakes gets five messages in one run:

1. the core's own schema (``schema.json``, draft 2020-12);
2. every extension reference against the registry, and its ``config`` block
   (or a listener's protocol block, or a route's ``per_filter_config`` entry)
   against that extension's schema;
3. cross-checks a schema cannot express: unique names, duplicate addresses,
   routes naming defined clusters, virtual host domains.

Every error carries ``file:line:column``, the path of the node and a message
in plain words. Only a file without errors is normalised and returned.

The normalised shape
--------------------
Plain ``dict``/``list``/``str``/``int``/``float``/``bool`` with every core
default filled in (the defaults are the ``default`` annotations of
``schema.json``), and:

- every core duration is a ``float`` of seconds (``"250ms"`` → ``0.25``);
  absent optional durations (``request_timeout``, a route's ``idle_timeout``,
  ``per_try_timeout``) stay absent;
- every extension reference is ``{"name": str, "config": dict}`` (a bare name
  becomes ``{"name": X, "config": {}}``, ``config: null`` becomes ``{}``);
  access log items keep their ``filter`` and health checks their
  ``interval``/``timeout``/thresholds beside ``name`` and ``config``;
- ``admin`` and each listener also get ``"host"`` and ``"port"`` parsed from
  ``"address"``; cluster endpoints are
  ``{"address": "h:p", "host": h, "port": p, "weight": int}``;
- a cluster without ``lb_policy`` gets ``{"name": "round_robin", "config": {}}``,
  an ``http`` block without ``filters`` gets ``[{"name": "router", "config": {}}]``;
- extension config blocks, extension protocol blocks (``tcp:``, ``kafka:``;
  ``null`` becomes ``{}``) and ``per_filter_config`` entries are passed through
  exactly as written: the extension's schema has checked them, and the
  extension parses its own durations.

Top level: ``admin`` {address, host, port, access_log_path?}, ``workers``
(int or "auto", default 1), ``stats`` {sinks: [ref]}, ``tracing``? {provider:
ref, sampling: 100}, ``listeners`` [...], ``clusters`` [...].
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import re
from pathlib import Path as FilePath
from typing import Any, Iterable, Iterator

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import validator_for

from ..access_log import check_format as check_access_log_format
from ..registry import Extension, Registry
from .loader import ConfigError, ConfigInvalid, Document, Path, format_path, parse_yaml
from .units import parse_address, parse_duration, parse_http_url

CORE_SCHEMA: dict[str, Any] = json.loads(FilePath(__file__).with_name("schema.json").read_text(encoding="utf-8"))


# -- formats -----------------------------------------------------------------

def _check_duration(value: object) -> bool:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        parse_duration(value)  # raises ValueError with the message shown
    return True  # other types are the "type" keyword's business


def _check_address(value: object) -> bool:
    if isinstance(value, str):
        parse_address(value)
    return True


def _check_http_url(value: object) -> bool:
    if isinstance(value, str):
        parse_http_url(value)
    return True


def _check_regex(value: object) -> bool:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
    return True


def _check_cidr(value: object) -> bool:
    if isinstance(value, str):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"expected an address range like 10.0.0.0/8 or ::1/128, got {value!r}") from None
    return True


#: The format checker used for the core schema and every extension schema:
#: jsonschema's standard formats plus ``duration``, ``address``, ``cidr``,
#: ``http_url`` (an http or https URL with a host, such as a collector's),
#: a ``regex`` that reports Python's own error, and ``access_log_format``
#: (outrider.access_log: its error names the bad operator, which the
#: report points at inside the string).
FORMAT_CHECKER = FormatChecker()
for _name, _check in (("duration", _check_duration), ("address", _check_address),
                      ("http_url", _check_http_url), ("regex", _check_regex), ("cidr", _check_cidr),
                      ("access_log_format", check_access_log_format)):
    FORMAT_CHECKER.checks(_name, raises=ValueError)(_check)


# -- public entry points -------------------------------------------------------

#: A config path ("*" for every item of a list), what to call it in the
#: error, and the values that are fine there (e.g. ``workers: 1``).
Unsupported = tuple[tuple[str, ...], str, tuple[Any, ...]]


def load_config(path: str, registry: Registry, unsupported: Iterable[Unsupported] = ()) -> dict[str, Any]:
    """Read, validate and normalise the configuration file at ``path``.

    ``unsupported`` names settings the caller accepts in the schema's shape
    but cannot honour; a config that uses one is refused with its position.

    Raises :class:`ConfigInvalid` with every error found, ``OSError`` when
    the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([ConfigError(path, 1, 1, "", f"not UTF-8 text: {exc}")]) from None
    return load_config_text(text, registry, source=path, unsupported=unsupported)


def load_config_text(
    text: str, registry: Registry, source: str = "<string>", unsupported: Iterable[Unsupported] = ()
) -> dict[str, Any]:
    """Validate and normalise configuration ``text`` (``source`` names it in
    errors). Raises :class:`ConfigInvalid` with every error found."""
    doc, errors = parse_yaml(text, source)
    if doc is None:
        raise ConfigInvalid(errors)
    # A string whose ${VAR} could not be substituted has already been
    # reported; what the checks then say about "${VAR}" is only noise.
    unresolved = {format_path(p) for p in doc.unresolved}
    errors += [e for e in _Checker(doc, registry, tuple(unsupported)).run() if e.path not in unresolved]
    if errors:
        raise ConfigInvalid(_tidy(errors))
    return normalise(doc.data, registry)


def _tidy(errors: list[ConfigError]) -> list[ConfigError]:
    """Without duplicates, in the order of the file."""
    unique = {(e.line, e.column, e.path, e.message): e for e in errors}
    return sorted(unique.values(), key=lambda e: (e.line, e.column))


# -- plain words for jsonschema's errors --------------------------------------

_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def _describe_value(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    return type(value).__name__


def _words(values: list[Any], last: str = "or") -> str:
    texts = [str(v) for v in values]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} {last} {texts[-1]}"


def _closest(word: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _resolve(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a local ``$ref`` ("#/$defs/x") followed; keywords
    beside the ``$ref`` win over the target's (2020-12 allows both)."""
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#"):
        return schema
    target: Any = root
    for part in ref[1:].split("/")[1:]:
        target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
    siblings = {k: v for k, v in schema.items() if k != "$ref"}
    return {**_resolve(target, root), **siblings}


def _describe_schema(schema: Any, root: dict[str, Any]) -> str:
    schema = _resolve(schema, root)
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(str(v) for v in schema["enum"])
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    if types:
        return _words([_TYPE_WORDS.get(t, t) for t in types])
    return "a valid value"


def _exclusive_keys(branches: Any) -> tuple[list[str], bool] | None:
    """For ``oneOf`` branches of the shape ``{required: [k]}`` (plus optionally
    one ``{not: ...}`` branch meaning "none of them"): the keys and whether
    none is allowed. Such a ``oneOf`` means "exactly (or at most) one of"."""
    if not isinstance(branches, list):
        return None
    keys: list[str] = []
    none_allowed = False
    for branch in branches:
        if isinstance(branch, dict) and set(branch) == {"required"} and len(branch["required"]) == 1:
            keys.append(branch["required"][0])
        elif isinstance(branch, dict) and set(branch) == {"not"}:
            none_allowed = True
        else:
            return None
    return keys, none_allowed


#: (path, message, at_key): at_key points the error at the mapping key. A
#: fourth item, when present, is the text inside the value to point at.
_Problem = tuple[Path, str, bool]


class _Explainer:
    """Turns jsonschema errors into positioned, readable problems."""

    def __init__(self, root: dict[str, Any], base: Path, listener_protocols: list[str] | None = None) -> None:
        self.root = root  # the schema, for resolving $ref
        self.base = base  # where the validated instance sits in the document
        self.listener_protocols = listener_protocols  # only for the core schema

    def explain(self, error: ValidationError) -> list[_Problem]:
        path = self.base + tuple(error.absolute_path)
        instance, keyword, expected = error.instance, error.validator, error.validator_value

        if keyword == "required":
            missing = [k for k in expected if isinstance(instance, dict) and k not in instance]
            return [(path, f"missing required field {k!r}", False) for k in missing]
        if keyword == "additionalProperties":
            return self._unknown_fields(error, path)
        if keyword == "type":
            types = [expected] if isinstance(expected, str) else list(expected)
            wanted = _words([_TYPE_WORDS.get(t, t) for t in types])
            return [(path, f"expected {wanted}, got {_describe_value(instance)}", False)]
        if keyword in ("oneOf", "anyOf"):
            return self._choice(error, path)
        if keyword == "enum":
            message = f"expected one of {', '.join(str(v) for v in expected)}; got {_describe_value(instance)}"
            if isinstance(instance, str):
                near = _closest(instance, [v for v in expected if isinstance(v, str)])
                if near:
                    message += f" (did you mean {near!r}?)"
            return [(path, message, False)]
        if keyword == "const":
            return [(path, f"expected {expected!r}, got {_describe_value(instance)}", False)]
        if keyword == "format":
            cause = str(error.cause) if error.cause else f"expected a valid {expected}, got {_describe_value(instance)}"
            # A cause that names the bad part of a string (an access log
            # format's operator) is pointed at inside the string.
            token = getattr(error.cause, "token", None)
            if isinstance(token, str) and token:
                return [(path, cause, False, token)]  # type: ignore[list-item]
            return [(path, cause, False)]
        return [(path, self._bound_message(keyword, expected, instance, error), False)]

    def _bound_message(self, keyword: str, expected: Any, instance: Any, error: ValidationError) -> str:
        if keyword == "minimum":
            return f"must be at least {expected}, got {instance}"
        if keyword == "maximum":
            return f"must be at most {expected}, got {instance}"
        if keyword == "exclusiveMinimum":
            return f"must be greater than {expected}, got {instance}"
        if keyword == "exclusiveMaximum":
            return f"must be less than {expected}, got {instance}"
        if keyword == "minItems":
            return "must not be an empty list" if expected == 1 else f"expected at least {expected} items, got {len(instance)}"
        if keyword == "maxItems":
            return f"expected at most {expected} items, got {len(instance)}"
        if keyword == "minLength":
            return "must not be empty" if expected == 1 else f"must be at least {expected} characters long"
        if keyword == "maxLength":
            return f"must be at most {expected} characters long"
        if keyword == "minProperties":
            fields = list(error.schema.get("properties", {}))
            return f"give at least one of {', '.join(fields)}" if fields else "must not be empty"
        if keyword == "uniqueItems":
            return "the items must be unique"
        if keyword == "pattern":
            return f"must match the pattern {expected}"
        return error.message

    def _unknown_fields(self, error: ValidationError, path: Path) -> list[_Problem]:
        allowed = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        is_listener = self.listener_protocols is not None and len(path) == 2 and path[0] == "listeners"
        problems = []
        for key in error.instance:
            if key in allowed or any(re.search(p, key) for p in patterns):
                continue
            near = _closest(key, allowed)
            if near:
                hint = f"did you mean {near!r}?"
            elif is_listener:
                fields = [k for k in allowed if k not in self.listener_protocols]
                hint = f"fields: {', '.join(fields)}"
            else:
                hint = f"allowed: {', '.join(allowed)}" if allowed else "no fields are allowed here"
            message = f"unknown field {key!r} ({hint})"
            if is_listener:
                message += f"; a listener's protocol block is one of: {', '.join(self.listener_protocols)}"
            problems.append((path + (key,), message, True))
        return problems

    def _choice(self, error: ValidationError, path: Path) -> list[_Problem]:
        instance = error.instance
        exclusive = _exclusive_keys(error.validator_value)
        if exclusive is not None:
            if not isinstance(instance, dict):
                return []  # the "type" keyword reports the wrong shape
            keys, none_allowed = exclusive
            found = [k for k in keys if k in instance]
            amount = "at most one" if none_allowed else "exactly one"
            if len(found) > 1:
                return [(path + (found[1],), f"expected {amount} of {', '.join(keys)}; found {_words(found, 'and')}", True)]
            if not found and not none_allowed:
                return [(path, f"expected {amount} of {', '.join(keys)}; found none", False)]
        # Errors grouped by the branch they came from; a branch whose type (or
        # const) the value does not even have is not the one the user meant.
        branches: dict[int, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        viable = [
            errs for errs in branches.values()
            if not any(e.validator in ("type", "const", "enum") and not e.relative_path for e in errs)
        ]
        if viable:
            best = min(viable, key=len)
            return [problem for sub in best for problem in self.explain(sub)]
        options = _words([_describe_schema(b, self.root) for b in error.validator_value])
        return [(path, f"expected {options}, got {_describe_value(instance)}", False)]


# -- where extensions are referenced ------------------------------------------

def _items(value: Any) -> list[tuple[int, Any]]:
    return list(enumerate(value)) if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _extension_refs(data: Any) -> Iterator[tuple[str, Path]]:
    """(category, path) of every extension reference present in ``data``."""
    data = _dict(data)
    for i, _ in _items(_dict(data.get("stats")).get("sinks")):
        yield "stats_sinks", ("stats", "sinks", i)
    if "provider" in _dict(data.get("tracing")):
        yield "tracers", ("tracing", "provider")
    for li, listener in _items(data.get("listeners")):
        listener = _dict(listener)
        for i, _ in _items(listener.get("network_filters")):
            yield "filters.network", ("listeners", li, "network_filters", i)
        for i, _ in _items(listener.get("access_log")):
            yield "access_loggers", ("listeners", li, "access_log", i)
        for i, _ in _items(_dict(listener.get("http")).get("filters")):
            yield "filters.http", ("listeners", li, "http", "filters", i)
    for ci, cluster in _items(data.get("clusters")):
        cluster = _dict(cluster)
        if "lb_policy" in cluster:
            yield "load_balancers", ("clusters", ci, "lb_policy")
        if "health_check" in cluster:
            yield "health_checkers", ("clusters", ci, "health_check")


def _routes(listener: dict[str, Any], li: int) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, route) of every route of a listener's http block."""
    for vi, vhost in _items(_dict(listener.get("http")).get("virtual_hosts")):
        for ri, route in _items(_dict(vhost).get("routes")):
            if isinstance(route, dict):
                yield ("listeners", li, "http", "virtual_hosts", vi, "routes", ri), route


def _get(data: Any, path: Path) -> Any:
    for part in path:
        data = data[part]
    return data


def _set(data: Any, path: Path, value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = value


# -- the checks ----------------------------------------------------------------

class _Checker:
    """Runs the three passes over one document, collecting every error."""

    def __init__(self, doc: Document, registry: Registry, unsupported: tuple[Unsupported, ...] = ()) -> None:
        self.doc = doc
        self.unsupported = unsupported
        self.registry = registry
        self.data = _dict(doc.data)
        self.errors: list[ConfigError] = []
        self._validators: dict[int, Any] = {}

    def run(self) -> list[ConfigError]:
        self.check_core_schema()
        self.check_extensions()
        self.check_cross_references()
        self.check_unsupported()
        return self.errors

    def report(self, path: Path, message: str, at_key: bool = False, token: str | None = None) -> None:
        self.errors.append(self.doc.error(path, message, at_key, token))

    def check_unsupported(self) -> None:
        for pattern, feature, fine in self.unsupported:
            for path, value in _matching(self.data, pattern):
                if value not in fine:
                    self.report(path, f"{feature}: not supported yet in this version of outrider; "
                                      "remove this setting", at_key=True)
        for ci, cluster in _items(self.data.get("clusters")):
            protocol = _dict(cluster).get("protocol")
            if isinstance(protocol, str) and protocol != "auto" and self.registry.get("codecs", protocol) is None:
                self.report(("clusters", ci, "protocol"), self.unknown_extension("codecs", protocol, always=("auto",)))

    # 1. the core schema

    def protocols(self) -> list[str]:
        return ["http"] + [p for p in self.registry.listener_protocols() if p != "http"]

    def check_core_schema(self) -> None:
        schema = copy.deepcopy(CORE_SCHEMA)
        # A listener may hold the protocol block of any installed extension
        # that serves one; that block's content is the extension's to check.
        listener_props = schema["$defs"]["listener"]["properties"]
        for key in self.protocols()[1:]:
            listener_props.setdefault(key, {
                "type": ["object", "null"],
                "description": f"The {key} protocol block (an extension's).",
            })
        validator = Draft202012Validator(schema, format_checker=FORMAT_CHECKER)
        explainer = _Explainer(schema, (), self.protocols())
        for error in validator.iter_errors(self.doc.data):
            for problem in explainer.explain(error):
                self.report(*problem)

    # 2. extensions

    def check_extensions(self) -> None:
        for category, path in _extension_refs(self.data):
            self.check_ref(category, path)
        for li, listener in _items(self.data.get("listeners")):
            if isinstance(listener, dict):
                self.check_protocol_block(listener, ("listeners", li))
                self.check_codec(_dict(listener.get("http")), ("listeners", li, "http"))
                for path, route in _routes(listener, li):
                    self.check_per_filter_config(route, path)

    def unknown_extension(self, category: str, name: str, always: tuple[str, ...] = ()) -> str:
        installed = self.registry.names(category)
        listing = f"installed: {', '.join(installed)}" if installed else "none installed"
        if always:
            listing += f"; always available: {', '.join(always)}"
        near = _closest(name, list(always) + installed) or self.registry.closest(category, name)
        if near:
            listing += f"; did you mean {near!r}?"
        return f"unknown {category} extension {name!r} ({listing})"

    def check_ref(self, category: str, path: Path) -> None:
        ref = _get(self.data, path)
        if isinstance(ref, str):
            name, config, name_path = ref, {}, path
        elif isinstance(ref, dict) and isinstance(ref.get("name"), str):
            name, config, name_path = ref["name"], ref.get("config"), path + ("name",)
        else:
            return  # a wrong shape; the core schema said so
        extension = self.registry.get(category, name)
        if extension is None:
            self.report(name_path, self.unknown_extension(category, name))
            return
        self.check_extension_config(extension, extension.schema, config, path + ("config",), path)

    def check_extension_config(
        self, extension: Extension, schema: dict[str, Any] | None, config: Any, path: Path, ref_path: Path
    ) -> None:
        """Check ``config`` (``None`` counts as ``{}``) against an extension's
        schema; errors point inside the block."""
        if config is None:
            config = {}
        if schema is None or not isinstance(config, dict):
            return  # a block that is not a mapping was reported by the core schema
        validator = self._validator(extension, schema, ref_path)
        if validator is None:
            return
        explainer = _Explainer(schema, path)
        try:
            for error in validator.iter_errors(config):
                for problem in explainer.explain(error):
                    self.report(*problem)
        except Exception as exc:  # e.g. a $ref to a document that cannot be fetched
            self.report(ref_path, f"cannot check the config of extension {extension.key}: {exc}")

    def _validator(self, extension: Extension, schema: dict[str, Any], ref_path: Path) -> Any:
        # An extension's schema is its author's; if it is itself broken, say
        # whose it is rather than crashing or silently accepting anything.
        key = id(schema)
        if key not in self._validators:
            cls = validator_for(schema, default=Draft202012Validator)
            try:
                cls.check_schema(schema)
                self._validators[key] = cls(schema, format_checker=FORMAT_CHECKER)
            except SchemaError as exc:
                self._validators[key] = exc
        validator = self._validators[key]
        if isinstance(validator, SchemaError):
            self.report(ref_path, f"extension {extension.key} (from {extension.distribution}) has an "
                                  f"invalid schema, so its config cannot be checked: {validator.message}")
            return None
        return validator

    def check_protocol_block(self, listener: dict[str, Any], path: Path) -> None:
        found = [k for k in listener if k == "http" or self.registry.listener_protocol(k) is not None]
        available = ", ".join(self.protocols())
        if not found:
            self.report(path, f"a listener needs exactly one protocol block; found none (available: {available})")
        elif len(found) > 1:
            self.report(path + (found[1],), f"a listener has exactly one protocol block; found "
                                            f"{_words(found, 'and')} (available: {available})", at_key=True)
        for key in found:
            extension = self.registry.listener_protocol(key) if key != "http" else None
            if extension is not None:
                self.check_extension_config(extension, extension.schema, listener[key], path + (key,), path + (key,))

    def check_codec(self, http: dict[str, Any], path: Path) -> None:
        codec = http.get("codec")
        if isinstance(codec, str) and codec != "auto" and self.registry.get("codecs", codec) is None:
            self.report(path + ("codec",), self.unknown_extension("codecs", codec, always=("auto",)))

    def check_per_filter_config(self, route: dict[str, Any], path: Path) -> None:
        for name, config in _dict(route.get("per_filter_config")).items():
            entry = path + ("per_filter_config", name)
            extension = self.registry.get("filters.http", name)
            if extension is None:
                self.report(entry, self.unknown_extension("filters.http", name), at_key=True)
                continue
            schema = getattr(extension, "per_route_schema", None) or extension.schema
            if isinstance(config, dict):
                self.check_extension_config(extension, schema, config, entry, entry)

    # 3. cross-checks

    def check_cross_references(self) -> None:
        listeners = [(i, l) for i, l in _items(self.data.get("listeners")) if isinstance(l, dict)]
        clusters = [(i, c) for i, c in _items(self.data.get("clusters")) if isinstance(c, dict)]
        self.check_unique_names("listener", "listeners", listeners)
        cluster_names = self.check_unique_names("cluster", "clusters", clusters)
        self.check_addresses(listeners)
        for li, listener in listeners:
            self.check_virtual_hosts(_dict(listener.get("http")), ("listeners", li, "http"))
            for path, route in _routes(listener, li):
                self.check_route_clusters(_dict(route.get("route")), path + ("route",), cluster_names)

    def check_unique_names(self, what: str, key: str, items: list[tuple[int, dict[str, Any]]]) -> list[str]:
        first: dict[str, int] = {}
        for index, item in items:
            name = item.get("name")
            if not isinstance(name, str):
                continue
            if name in first:
                line, _ = self.doc.position((key, first[name], "name"))
                self.report((key, index, "name"), f"duplicate {what} name {name!r} (first used on line {line})")
            else:
                first[name] = index
        return list(first)

    def check_addresses(self, listeners: list[tuple[int, dict[str, Any]]]) -> None:
        taken: dict[tuple[str, int], str] = {}
        admin_address = _dict(self.data.get("admin")).get("address", "127.0.0.1:9901")
        try:
            taken[parse_address(admin_address)] = "the admin interface"
        except ValueError:
            pass  # reported by the schema
        for index, listener in listeners:
            try:
                host, port = parse_address(listener.get("address"))  # type: ignore[arg-type]
            except ValueError:
                continue
            if port == 0:  # each bind picks its own port
                continue
            owner = taken.get((host.lower(), port))
            if owner:
                self.report(("listeners", index, "address"), f"address {listener['address']} is already used by {owner}")
            else:
                taken[(host.lower(), port)] = f"listener {listener.get('name', index)!r}"

    def check_virtual_hosts(self, http: dict[str, Any], path: Path) -> None:
        domains: dict[str, str] = {}
        names: set[str] = set()
        for vi, vhost in _items(http.get("virtual_hosts")):
            if not isinstance(vhost, dict):
                continue
            vpath = path + ("virtual_hosts", vi)
            name = vhost.get("name")
            if isinstance(name, str):
                if name in names:
                    self.report(vpath + ("name",), f"duplicate virtual host name {name!r} in this listener")
                names.add(name)
            for di, domain in _items(vhost.get("domains")):
                if not isinstance(domain, str):
                    continue
                problem = _domain_problem(domain)
                if problem:
                    self.report(vpath + ("domains", di), problem)
                    continue
                owner = domains.get(domain.lower())
                if owner is not None:
                    self.report(vpath + ("domains", di), f"domain {domain!r} is already served by virtual host {owner!r}")
                else:
                    domains[domain.lower()] = name if isinstance(name, str) else f"virtual_hosts[{vi}]"

    def check_route_clusters(self, action: dict[str, Any], path: Path, clusters: list[str]) -> None:
        refs: list[tuple[Path, Any]] = [(path + ("cluster",), action.get("cluster"))] if "cluster" in action else []
        for wi, weighted in _items(action.get("weighted_clusters")):
            if isinstance(weighted, dict) and "name" in weighted:
                refs.append((path + ("weighted_clusters", wi, "name"), weighted["name"]))
        for ref_path, name in refs:
            if isinstance(name, str) and name not in clusters:
                near = _closest(name, clusters)
                if near:
                    hint = f"did you mean {near!r}?"
                else:
                    hint = f"defined: {', '.join(clusters)}" if clusters else "no clusters are defined"
                self.report(ref_path, f"unknown cluster {name!r} ({hint})")


def _domain_problem(domain: str) -> str | None:
    """Envoy's rule: one wildcard at most, as the whole domain or at its
    start (``*.example.com``, ``*example.com``) or end (``example.*``)."""
    if not domain:
        return "a domain must not be empty"
    stars = domain.count("*")
    if stars > 1:
        return f"domain {domain!r} has {stars} wildcards; at most one is allowed"
    if stars == 1 and not (domain.startswith("*") or domain.endswith("*")):
        return f"domain {domain!r}: a wildcard may only be the whole domain (*), its start (*.example.com) or its end (example.*)"
    return None


def _matching(data: Any, pattern: tuple[str, ...], path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, value) of every place in ``data`` that ``pattern`` names."""
    if not pattern:
        yield path, data
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        for i, item in _items(data):
            yield from _matching(item, rest, path + (i,))
    elif isinstance(data, dict) and head in data:
        yield from _matching(data[head], rest, path + (head,))


# -- normalisation -------------------------------------------------------------

def _canonical_ref(ref: Any) -> Any:
    if isinstance(ref, str):
        return {"name": ref, "config": {}}
    if isinstance(ref, dict):
        return {**ref, "config": ref.get("config") or {}}
    return ref


def _fill(value: Any, schema: Any, root: dict[str, Any]) -> Any:
    """``value`` with the schema's defaults filled in and its durations
    converted to seconds; parts the schema does not describe (extension
    config blocks) are returned as they are."""
    schema = _resolve(schema, root)
    if schema.get("format") == "duration" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return parse_duration(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        result = {k: _fill(v, properties[k], root) if k in properties else v for k, v in value.items()}
        for key, sub in properties.items():
            default = _resolve(sub, root).get("default")
            if key not in result and default is not None:
                result[key] = _fill(copy.deepcopy(default), sub, root)
        return result
    if isinstance(value, list) and "items" in schema:
        return [_fill(item, schema["items"], root) for item in value]
    return value


def normalise(data: Any, registry: Registry) -> dict[str, Any]:
    """The normalised form (see the module docstring) of configuration data
    that has passed validation."""
    config = copy.deepcopy(data) if isinstance(data, dict) else {}
    # Shapes first (so that the defaults of e.g. a bare-name health check
    # are filled like those of a full one), then defaults, then derived keys.
    for _, path in _extension_refs(config):
        _set(config, path, _canonical_ref(_get(config, path)))
    for cluster in config.get("clusters", []):
        cluster["endpoints"] = [{"address": e} if isinstance(e, str) else e for e in cluster.get("endpoints", [])]
    config = _fill(config, CORE_SCHEMA, CORE_SCHEMA)

    config["admin"]["host"], config["admin"]["port"] = parse_address(config["admin"]["address"])
    protocols = set(registry.listener_protocols())
    for listener in config["listeners"]:
        listener["host"], listener["port"] = parse_address(listener["address"])
        for key in protocols & set(listener):
            if listener[key] is None:
                listener[key] = {}
    for cluster in config["clusters"]:
        for endpoint in cluster["endpoints"]:
            endpoint["host"], endpoint["port"] = parse_address(endpoint["address"])
    return config
