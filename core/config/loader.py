"""Reading a YAML configuration: plain Python data plus where every node was.

ruamel.yaml's round-trip loader keeps the line and column of every mapping
key, mapping value and sequence item. :func:`parse_yaml` turns its document
into plain ``dict``/``list``/``str``/``int``/``float``/``bool``/``None`` (so
nothing downstream sees a ruamel type), substitutes ``${VAR}`` references
from the environment, and keeps the positions in a side table keyed by the
node's path, e.g. ``("listeners", 0, "http", "stat_prefix")``.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

#: A node's address in the document: mapping keys and sequence indexes.
Path = tuple[str | int, ...]
#: (line, column), both 1-based.
Position = tuple[int, int]


@dataclass
class ConfigError:
    """One problem in a configuration file, at a 1-based line and column."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigInvalid(Exception):
    """The configuration was rejected; ``errors`` holds every problem found."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: list[ConfigError] = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: Path) -> str:
    """``("listeners", 0, "http")`` → ``listeners[0].http``; keys that are not
    plain words (``per_filter_config`` may hold dotted names) are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


@dataclass
class Document:
    """A loaded YAML document: plain ``data`` and the positions of its nodes."""

    source: str
    data: Any
    #: Position of the value at each path (for a mapping: its first key or ``{``).
    value_positions: dict[Path, Position] = field(default_factory=dict)
    #: Position of the key that holds each mapping member.
    key_positions: dict[Path, Position] = field(default_factory=dict)
    #: Paths of strings whose ``${VAR}`` could not be substituted.
    unresolved: set[Path] = field(default_factory=set)
    #: The source text (to point inside a scalar, see :meth:`token_position`).
    text: str = ""

    def position(self, path: Iterable[str | int]) -> Position:
        """Where the value at ``path`` is; a path the file does not contain
        (a missing field) falls back to its nearest ancestor that it does."""
        path = tuple(path)
        while path and path not in self.value_positions:
            path = path[:-1]
        return self.value_positions.get(path, (1, 1))

    def key_position(self, path: Iterable[str | int]) -> Position:
        """Where the key of the mapping member at ``path`` is (for errors
        about the key itself, such as an unknown field)."""
        path = tuple(path)
        return self.key_positions.get(path) or self.position(path)

    def token_position(self, path: Iterable[str | int], token: str) -> Position:
        """Where ``token`` first appears in the source from the start of the
        value at ``path`` on (within the next few lines): an error inside a
        string (a bad operator in a format string) then points at the bad
        part itself. Falls back to the value's position."""
        line, column = self.position(path)
        if token and self.text:
            lines = self.text.split("\n")
            for index in range(line - 1, min(line + 19, len(lines))):
                start = column - 1 if index == line - 1 else 0
                found = lines[index].find(token, start)
                if found >= 0:
                    return index + 1, found + 1
        return line, column

    def error(self, path: Path, message: str, at_key: bool = False, token: str | None = None) -> ConfigError:
        if token:
            line, column = self.token_position(path, token)
        else:
            line, column = self.key_position(path) if at_key else self.position(path)
        return ConfigError(self.source, line, column, format_path(path), message)


# `$${` is a literal `${`; `${NAME}` and `${NAME:-default}` are references;
# any other `${` is a mistake worth reporting rather than passing through.
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def substitute_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in ``text`` from ``environ``.

    Returns the new text and a list of problems (unset variables, malformed
    references). As in the shell, ``:-`` uses the default when the variable
    is unset or empty.
    """
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        if token == "${":
            problems.append("malformed ${...}: write ${NAME} or ${NAME:-default} ($${ for a literal ${)")
            return token
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            problems.append(f"environment variable {name} is not set")
            return token
        return value

    return _ENV_REF.sub(replace, text), problems


def parse_yaml(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> tuple[Document | None, list[ConfigError]]:
    """Parse ``text``; returns the document (``None`` on a YAML syntax error)
    and the errors found while reading it (syntax, environment variables)."""
    yaml = YAML(typ="rt")
    try:
        raw = yaml.load(text)
    except MarkedYAMLError as exc:
        return None, [_syntax_error(exc, source)]
    except YAMLError as exc:  # no position known
        return None, [ConfigError(source, 1, 1, "", f"invalid YAML: {exc}")]
    converter = _Converter(source, os.environ if environ is None else environ)
    if raw is None:  # an empty file is an empty config
        raw = CommentedMap()
    if isinstance(raw, (CommentedMap, CommentedSeq)) and raw.lc.line is not None:
        converter.doc.value_positions[()] = (raw.lc.line + 1, raw.lc.col + 1)
    converter.doc.data = converter.convert(raw, (), set())
    converter.doc.text = text
    return converter.doc, converter.errors


def _syntax_error(exc: MarkedYAMLError, source: str) -> ConfigError:
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    message = exc.problem or exc.context or "syntax error"
    # The context ("while parsing a flow sequence") says where the broken
    # construct started, which is often the real mistake.
    if exc.problem and exc.context and exc.context_mark is not None:
        message += f" ({exc.context} started at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
    return ConfigError(source, line, column, "", f"invalid YAML: {message}")


class _Converter:
    """Turns ruamel's round-trip nodes into plain data, recording positions."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.doc = Document(source, None)
        self.environ = environ
        self.errors: list[ConfigError] = []

    def convert(self, node: Any, path: Path, active: set[int]) -> Any:
        if isinstance(node, (CommentedMap, CommentedSeq)):
            # An alias may point at one of its own ancestors (`&a [*a]`);
            # that is not configuration, and would recurse forever.
            if id(node) in active:
                self.errors.append(self.doc.error(path, "a YAML alias refers to a node that contains it"))
                return None
            active = active | {id(node)}
        if isinstance(node, CommentedMap):
            result: dict[str, Any] = {}
            for key, value in node.items():
                name = key if isinstance(key, str) else str(key)
                child = path + (name,)
                self._record(node, key, child, is_mapping=True)
                result[name] = self.convert(value, child, active)
            return result
        if isinstance(node, CommentedSeq):
            items = []
            for index, value in enumerate(node):
                child = path + (index,)
                self._record(node, index, child, is_mapping=False)
                items.append(self.convert(value, child, active))
            return items
        return self._scalar(node, path)

    def _record(self, node: CommentedMap | CommentedSeq, key: Any, path: Path, is_mapping: bool) -> None:
        # Keys brought in by a `<<: *anchor` merge have no position of their
        # own in this mapping; they fall back to the mapping's position.
        try:
            if is_mapping:
                key_line, key_col = node.lc.key(key)
                self.doc.key_positions[path] = (key_line + 1, key_col + 1)
                line, col = node.lc.value(key)
                # An empty value (`config:`) is "found" at the next token,
                # often lines below; its key is the better place to point at.
                if node[key] is None and line != key_line:
                    line, col = key_line, key_col
            else:
                line, col = node.lc.item(key)
        except (KeyError, IndexError, TypeError):
            return
        self.doc.value_positions[path] = (line + 1, col + 1)

    def _scalar(self, node: Any, path: Path) -> Any:
        # ScalarBoolean subclasses int, so it must be tested before int.
        if isinstance(node, (bool, ScalarBoolean)):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if isinstance(node, str):
            text, problems = substitute_env(str(node), self.environ)
            for problem in problems:
                self.errors.append(self.doc.error(path, problem))
            if problems:
                self.doc.unresolved.add(path)
            return text
        if node is None:
            return None
        if isinstance(node, (datetime.date, datetime.datetime)):
            return node.isoformat()
        if isinstance(node, TaggedScalar):
            self.errors.append(self.doc.error(path, f"unsupported YAML tag {getattr(node.tag, 'value', node.tag)!r}"))
            return str(node.value)
        self.errors.append(self.doc.error(path, f"unsupported YAML value of type {type(node).__name__}"))
        return None
