"""Configuration loading: positions, env substitution, core and extension
schemas, cross-checks, and the normalised shape.

The registries here are built in-test from small Extension records (the
registry is plain data); no extension code runs.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from outrider.config import (
    ConfigError,
    ConfigInvalid,
    load_config,
    load_config_text,
    parse_address,
    parse_duration,
)
from outrider.registry import Extension, Registry

EXAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "config-example.yaml"


@dataclass(frozen=True)
class RouteAwareExtension(Extension):
    """An HTTP filter with a different schema for its per-route config."""

    per_route_schema: dict[str, Any] | None = None


def _factory(config: dict[str, Any], ctx: Any) -> None:
    return None


def make_registry(*extensions: tuple[str, str] | tuple[str, str, dict[str, Any] | None] | Extension) -> Registry:
    """A registry of stub extensions: (category, name[, schema]) or Extension."""
    registry = Registry()
    for spec in extensions:
        if isinstance(spec, Extension):
            registry.add(spec)
        else:
            category, name, *schema = spec
            registry.add(Extension(name=name, category=category, factory=_factory, schema=schema[0] if schema else None))
    return registry


def obj(**properties: Any) -> dict[str, Any]:
    """A closed object schema."""
    return {"type": "object", "additionalProperties": False, "properties": properties}


DURATION = {"type": ["string", "number"], "format": "duration"}
ADDRESS = {"type": "string", "format": "address"}

BASIC = make_registry(
    ("filters.http", "router", obj(suppress_envoy_headers={"type": "boolean"})),
    ("codecs", "http1", obj()),
    ("load_balancers", "round_robin", obj()),
    ("load_balancers", "least_request", obj(choice_count={"type": "integer", "minimum": 2})),
    ("load_balancers", "random", obj()),
)


def load(text: str, registry: Registry = BASIC) -> dict[str, Any]:
    return load_config_text(textwrap.dedent(text), registry, source="test.yaml")


def errors(text: str, registry: Registry = BASIC) -> list[ConfigError]:
    with pytest.raises(ConfigInvalid) as info:
        load(text, registry)
    return info.value.errors


def only_error(text: str, registry: Registry = BASIC) -> ConfigError:
    found = errors(text, registry)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def http_listener(routes: str = "", extra: str = "", vhosts: str | None = None) -> str:
    """A valid config with one HTTP listener; ``routes`` are YAML lines at
    the routes' indentation, ``extra`` more top-level YAML."""
    if vhosts is None:
        vhosts = "        - name: all\n          domains: ['*']\n          routes:\n" + (
            routes or "            - {match: {prefix: /}, route: {cluster: web}}\n"
        )
    return (
        "listeners:\n"
        "  - name: web\n"
        "    address: 127.0.0.1:10000\n"
        "    http:\n"
        "      stat_prefix: web\n"
        "      virtual_hosts:\n"
        f"{vhosts}"
        "clusters:\n"
        "  - {name: web, endpoints: ['127.0.0.1:8080']}\n"
        f"{extra}"
    )


# -- units ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("0s", 0.0),
     (3, 3.0), (0.5, 0.5), ("10", 10.0), (".5s", 0.5)],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", ["5 s", "-1s", "5x", "", "s", "1m30s", " 5s", "5S", -1, True, float("inf"), None])
def test_parse_duration_rejects_junk(bad: Any) -> None:
    with pytest.raises(ValueError, match="expected a duration like 250ms, 5s, 1m, 1h"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0.0.0.0:10000", ("0.0.0.0", 10000)), ("[::1]:9901", ("::1", 9901)), ("localhost:0", ("localhost", 0)),
     ("api.internal:65535", ("api.internal", 65535)), ("[fe80::1]:80", ("fe80::1", 80))],
)
def test_parse_address(text: str, parsed: tuple[str, int]) -> None:
    assert parse_address(text) == parsed


@pytest.mark.parametrize(
    ("bad", "why"),
    [("localhost", "no port"), ("::1:80", "brackets"), ("[nope]:80", "not an IPv6"), (":80", "no host"),
     ("h:65536", "out of range"), ("h:-1", "not a number"), ("h:8o", "not a number"), ("a b:1", "not a host"),
     ("h:", "not a number")],
)
def test_parse_address_rejects_junk(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address(bad)


# -- error format and positions ------------------------------------------------

def test_config_error_str_omits_an_empty_path() -> None:
    assert str(ConfigError("f.yaml", 3, 7, "a.b", "bad")) == "f.yaml:3:7: a.b: bad"
    assert str(ConfigError("f.yaml", 3, 7, "", "bad")) == "f.yaml:3:7: bad"
    both = ConfigInvalid([ConfigError("f", 1, 1, "", "x"), ConfigError("f", 2, 1, "y", "z")])
    assert str(both) == "f:1:1: x\nf:2:1: y: z"


def test_yaml_syntax_error_is_one_error_with_its_position() -> None:
    error = only_error("admin:\n  address: [127.0.0.1:9901\nworkers: 1\n")
    assert (error.file, error.line, error.column) == ("test.yaml", 3, 8)
    assert error.path == ""
    assert error.message.startswith("invalid YAML: ")
    assert "line 2" in error.message  # where the unclosed flow sequence began


def test_duplicate_yaml_key_is_an_error() -> None:
    error = only_error("workers: 1\nworkers: 2\n")
    assert (error.line, error.column) == (2, 1)
    assert "duplicate key" in error.message


def test_unknown_field_points_at_the_key_and_suggests() -> None:
    error = only_error(http_listener(routes="            - match: {prefix: /}\n"
                                            "              route: {cluster: web, timout: 5s}\n"))
    assert (error.line, error.column) == (11, 37)
    assert error.path == "listeners[0].http.virtual_hosts[0].routes[0].route.timout"
    assert error.message == "unknown field 'timout' (did you mean 'timeout'?)"


def test_unknown_field_without_a_close_match_lists_the_allowed_ones() -> None:
    error = only_error("admin: {address: 127.0.0.1:9901, zzz: 1}\n")
    assert (error.line, error.column, error.path) == (1, 34, "admin.zzz")
    assert error.message == "unknown field 'zzz' (allowed: address, access_log_path)"


def test_type_error_points_at_the_value_in_plain_words() -> None:
    error = only_error("admin:\n  address:\n    - 127.0.0.1:9901\n")
    assert (error.line, error.column, error.path) == (3, 5, "admin.address")
    assert error.message == "expected a string, got a list"


def test_missing_required_field_points_at_the_mapping() -> None:
    text = "listeners:\n  - name: web\n    address: 127.0.0.1:10000\n    http:\n      codec: auto\n"
    error = only_error(text)
    assert (error.line, error.column, error.path) == (5, 7, "listeners[0].http")
    assert error.message == "missing required field 'stat_prefix'"


def test_every_error_in_a_file_is_reported_in_file_order() -> None:
    text = textwrap.dedent("""\
        admin: {address: nowhere}
        workers: 0
        listeners:
          - name: web
            address: 127.0.0.1:10000
            http:
              stat_prefix: web
              idle_timeout: 5x
              max_request_headers_kb: 9000
        clusters:
          - name: c
            endpoints: ["127.0.0.1:1"]
            lb_policy: round_robbin
            protcol: http2
        """)
    found = errors(text)
    assert [(e.line, e.column, e.path) for e in found] == [
        (1, 18, "admin.address"),
        (2, 10, "workers"),
        (8, 21, "listeners[0].http.idle_timeout"),
        (9, 31, "listeners[0].http.max_request_headers_kb"),
        (13, 16, "clusters[0].lb_policy"),
        (14, 5, "clusters[0].protcol"),
    ]
    assert "expected an address like" in found[0].message and "'nowhere'" in found[0].message
    assert found[1].message == "must be at least 1, got 0"
    assert found[2].message.startswith("expected a duration like 250ms, 5s, 1m, 1h")
    assert found[3].message == "must be at most 8192, got 9000"
    assert "did you mean 'round_robin'?" in found[4].message
    assert found[5].message == "unknown field 'protcol' (did you mean 'protocol'?)"


def test_load_config_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "outrider.yaml"
    path.write_text("workers: many\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(str(path), BASIC)
    assert str(info.value) == f"{path}:1:10: workers: expected an integer or 'auto', got the string 'many'"
    path.write_text("workers: auto\n")
    assert load_config(str(path), BASIC)["workers"] == "auto"


def test_an_empty_file_is_an_empty_config() -> None:
    config = load("")
    assert config["listeners"] == [] and config["clusters"] == []
    assert (config["admin"]["host"], config["admin"]["port"]) == ("127.0.0.1", 9901)
    assert config["workers"] == 1


# -- environment variables -----------------------------------------------------

def test_env_substitution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIDER_T_PORT", "10001")
    monkeypatch.setenv("OUTRIDER_T_HOST", "127.0.0.1")
    monkeypatch.delenv("OUTRIDER_T_UNSET", raising=False)
    config = load("""\
        listeners:
          - name: ${OUTRIDER_T_UNSET:-fallback}
            address: ${OUTRIDER_T_HOST}:${OUTRIDER_T_PORT}
            http:
              stat_prefix: literal-$${OUTRIDER_T_PORT}
              virtual_hosts: []
        """)
    listener = config["listeners"][0]
    assert listener["name"] == "fallback"
    assert listener["address"] == "127.0.0.1:10001" and listener["port"] == 10001
    assert listener["http"]["stat_prefix"] == "literal-${OUTRIDER_T_PORT}"


def test_env_substitution_keeps_the_value_a_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIDER_T_PREFIX", "42")
    config = load("listeners:\n  - {name: a, address: '127.0.0.1:1', http: {stat_prefix: '${OUTRIDER_T_PREFIX}'}}\n")
    assert config["listeners"][0]["http"]["stat_prefix"] == "42"


def test_unset_env_variable_is_an_error_at_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUTRIDER_T_UNSET", raising=False)
    # Only the substitution is reported, not the address that "${...}" is not.
    error = only_error("admin:\n  address: 127.0.0.1:${OUTRIDER_T_UNSET}\n")
    assert (error.line, error.column, error.path) == (2, 12, "admin.address")
    assert error.message == "environment variable OUTRIDER_T_UNSET is not set"


def test_env_default_applies_when_the_variable_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTRIDER_T_EMPTY", "")
    config = load("admin: {address: '127.0.0.1:${OUTRIDER_T_EMPTY:-9999}'}\n")
    assert config["admin"]["port"] == 9999


# -- extensions ----------------------------------------------------------------

def test_unknown_extension_lists_the_installed_ones_and_the_closest() -> None:
    text = "clusters:\n  - name: c\n    endpoints: ['127.0.0.1:1']\n    lb_policy: {name: round_robbin}\n"
    error = only_error(text)
    assert (error.line, error.column, error.path) == (4, 23, "clusters[0].lb_policy.name")
    assert error.message == (
        "unknown load_balancers extension 'round_robbin' "
        "(installed: least_request, random, round_robin; did you mean 'round_robin'?)"
    )


def test_unknown_extension_with_none_installed() -> None:
    error = only_error("stats:\n  sinks: [prometheus]\n")
    assert (error.line, error.column, error.path) == (2, 11, "stats.sinks[0]")
    assert error.message == "unknown stats_sinks extension 'prometheus' (none installed)"


def test_extension_config_is_checked_by_its_schema_inside_the_block() -> None:
    registry = make_registry(
        ("stats_sinks", "statsd", {**obj(address=ADDRESS, flush_interval=DURATION, prefix={"type": "string"}),
                                    "required": ["address"]}),
    )
    text = textwrap.dedent("""\
        stats:
          sinks:
            - name: statsd
              config:
                address: 127.0.0.1
                flush_interval: 5 s
                prefx: edge
            - statsd
        """)
    found = errors(text, registry)
    assert [(e.line, e.column, e.path) for e in found] == [
        (5, 18, "stats.sinks[0].config.address"),
        (6, 25, "stats.sinks[0].config.flush_interval"),
        (7, 9, "stats.sinks[0].config.prefx"),
        (8, 7, "stats.sinks[1].config"),
    ]
    assert "expected an address like" in found[0].message
    assert found[1].message.startswith("expected a duration like 250ms, 5s, 1m, 1h")
    assert found[2].message == "unknown field 'prefx' (did you mean 'prefix'?)"
    # A bare name is the same as an empty config block.
    assert found[3].message == "missing required field 'address'"


def test_extension_config_passes_through_as_written() -> None:
    registry = make_registry(("stats_sinks", "statsd", obj(flush_interval=DURATION)), ("stats_sinks", "prometheus"))
    config = load("stats: {sinks: [prometheus, {name: statsd, config: {flush_interval: 5s}}]}\n", registry)
    assert config["stats"]["sinks"] == [
        {"name": "prometheus", "config": {}},
        {"name": "statsd", "config": {"flush_interval": "5s"}},
    ]


def test_absent_lb_policy_needs_no_round_robin_installed() -> None:
    registry = make_registry(("filters.http", "router"))
    config = load(http_listener(), registry)
    assert config["clusters"][0]["lb_policy"] == {"name": "round_robin", "config": {}}
    # ...but naming it explicitly does need it.
    text = http_listener().replace("endpoints:", "lb_policy: round_robin, endpoints:")
    assert "unknown load_balancers extension 'round_robin' (none installed)" in only_error(text, registry).message


def test_codec_auto_is_always_valid_and_others_must_be_installed() -> None:
    registry = make_registry(("filters.http", "router"), ("codecs", "http1"))
    explicit = http_listener().replace("stat_prefix: web", "stat_prefix: web\n      codec: auto")
    assert load(explicit, registry)["listeners"][0]["http"]["codec"] == "auto"
    assert load(explicit.replace("auto", "http1"), registry)["listeners"][0]["http"]["codec"] == "http1"
    error = only_error(http_listener().replace("stat_prefix: web", "stat_prefix: web\n      codec: http3"), registry)
    assert (error.line, error.column, error.path) == (6, 14, "listeners[0].http.codec")
    assert error.message == "unknown codecs extension 'http3' (installed: http1; always available: auto; did you mean 'http1'?)"


def test_listener_protocol_block_is_checked_by_its_extension() -> None:
    tcp = Extension(name="tcp_proxy", category="filters.network", factory=_factory, listener_protocol="tcp",
                    schema={**obj(cluster={"type": "string"}, idle_timeout=DURATION), "required": ["cluster"]})
    registry = make_registry(tcp)
    config = load("listeners:\n  - {name: db, address: '127.0.0.1:5433', tcp: {cluster: db, idle_timeout: 1h}}\n", registry)
    assert config["listeners"][0]["tcp"] == {"cluster": "db", "idle_timeout": "1h"}
    error = only_error("listeners:\n  - name: db\n    address: 127.0.0.1:5433\n    tcp: {cluster: db, idle_timeout: 1x}\n", registry)
    assert error.path == "listeners[0].tcp.idle_timeout" and (error.line, error.column) == (4, 38)
    error = only_error("listeners:\n  - name: db\n    address: 127.0.0.1:5433\n    tcp: {}\n", registry)
    assert (error.line, error.column, error.path) == (4, 10, "listeners[0].tcp")
    assert error.message == "missing required field 'cluster'"
    error = only_error("listeners:\n  - name: db\n    address: 127.0.0.1:5433\n    tcp: {cluster: 7}\n", registry)
    assert (error.path, error.message) == ("listeners[0].tcp.cluster", "expected a string, got the integer 7")


def test_listener_needs_exactly_one_protocol_block() -> None:
    tcp = Extension(name="tcp_proxy", category="filters.network", factory=_factory, listener_protocol="tcp")
    registry = make_registry(tcp, ("filters.http", "router"))
    none = only_error("listeners:\n  - name: a\n    address: 127.0.0.1:1\n", registry)
    assert (none.line, none.column, none.path) == (2, 5, "listeners[0]")
    assert none.message == "a listener needs exactly one protocol block; found none (available: http, tcp)"
    two = only_error("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    http: {stat_prefix: a}\n    tcp: {}\n", registry)
    assert (two.line, two.column, two.path) == (5, 5, "listeners[0].tcp")
    assert two.message == "a listener has exactly one protocol block; found http and tcp (available: http, tcp)"


def test_unknown_listener_key_lists_the_protocols() -> None:
    tcp = Extension(name="tcp_proxy", category="filters.network", factory=_factory, listener_protocol="tcp")
    registry = make_registry(tcp)
    found = errors("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    tpc: {cluster: x}\n", registry)
    unknown = next(e for e in found if e.path == "listeners[0].tpc")
    assert (unknown.line, unknown.column) == (4, 5)
    assert unknown.message == "unknown field 'tpc' (did you mean 'tcp'?); a listener's protocol block is one of: http, tcp"
    # Without the extension installed, `tcp` itself is unknown.
    found = errors("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    tcp: {cluster: x}\n", make_registry())
    assert any(e.path == "listeners[0].tcp" and "protocol block is one of: http" in e.message for e in found)


def test_per_filter_config_uses_the_filters_per_route_schema() -> None:
    ratelimit = RouteAwareExtension(
        name="local_ratelimit", category="filters.http", factory=_factory,
        schema={**obj(tokens={"type": "integer"}, stat_prefix={"type": "string"}), "required": ["stat_prefix"]},
        per_route_schema=obj(tokens={"type": "integer", "minimum": 1}),
    )
    registry = make_registry(ratelimit, ("filters.http", "router", obj()))
    routes = ("            - match: {prefix: /}\n"
              "              route: {cluster: web}\n"
              "              per_filter_config:\n"
              "                local_ratelimit: {tokens: 0}\n"
              "                router: {x: 1}\n"
              "                rate_limit: {}\n")
    found = errors(http_listener(routes=routes), registry)
    assert [(e.line, e.column, e.path) for e in found] == [
        (13, 43, "listeners[0].http.virtual_hosts[0].routes[0].per_filter_config.local_ratelimit.tokens"),
        (14, 26, "listeners[0].http.virtual_hosts[0].routes[0].per_filter_config.router.x"),
        (15, 17, "listeners[0].http.virtual_hosts[0].routes[0].per_filter_config.rate_limit"),
    ]
    assert found[0].message == "must be at least 1, got 0"
    assert found[2].message == ("unknown filters.http extension 'rate_limit' "
                                "(installed: local_ratelimit, router; did you mean 'local_ratelimit'?)")


def test_an_extension_with_a_broken_schema_is_named() -> None:
    registry = make_registry(("stats_sinks", "weird", {"type": "no-such-type"}))
    error = only_error("stats: {sinks: [weird]}\n", registry)
    assert error.path == "stats.sinks[0]"
    assert "stats_sinks/weird" in error.message and "invalid schema" in error.message


# -- cross-checks ----------------------------------------------------------------

def test_route_to_an_unknown_cluster() -> None:
    routes = ("            - match: {prefix: /a}\n"
              "              route: {cluster: wbe}\n"
              "            - match: {prefix: /}\n"
              "              route: {weighted_clusters: [{name: web, weight: 1}, {name: zzz, weight: 2}]}\n")
    found = errors(http_listener(routes=routes))
    assert [(e.line, e.column, e.path, e.message) for e in found] == [
        (11, 32, "listeners[0].http.virtual_hosts[0].routes[0].route.cluster", "unknown cluster 'wbe' (did you mean 'web'?)"),
        (13, 74, "listeners[0].http.virtual_hosts[0].routes[1].route.weighted_clusters[1].name",
         "unknown cluster 'zzz' (defined: web)"),
    ]


def test_weighted_cluster_weights_are_positive_integers() -> None:
    routes = "            - {match: {prefix: /}, route: {weighted_clusters: [{name: web, weight: 0}, {name: web, weight: 1.5}]}}\n"
    found = errors(http_listener(routes=routes))
    assert [e.message for e in found] == ["must be at least 1, got 0", "expected an integer, got the number 1.5"]


def test_a_domain_in_two_virtual_hosts_of_a_listener() -> None:
    vhosts = ("        - name: one\n          domains: [example.com, '*.example.com']\n"
              "        - name: two\n          domains: [Example.COM]\n")
    error = only_error(http_listener(vhosts=vhosts))
    assert (error.line, error.column, error.path) == (10, 21, "listeners[0].http.virtual_hosts[1].domains[0]")
    assert error.message == "domain 'Example.COM' is already served by virtual host 'one'"


@pytest.mark.parametrize("domain", ["*", "*.example.com", "*example.com", "example.*", "example*", "api.example.com:*"])
def test_valid_wildcard_domains(domain: str) -> None:
    vhosts = f"        - name: one\n          domains: ['{domain}']\n"
    assert load(http_listener(vhosts=vhosts))["listeners"][0]["http"]["virtual_hosts"][0]["domains"] == [domain]


@pytest.mark.parametrize(("domain", "words"), [("*.example.*", "at most one"), ("a.*.com", "wildcard may only be"), ("", "empty")])
def test_invalid_wildcard_domains(domain: str, words: str) -> None:
    vhosts = f"        - name: one\n          domains: ['{domain}']\n"
    error = only_error(http_listener(vhosts=vhosts))
    assert error.path == "listeners[0].http.virtual_hosts[0].domains[0]" and words in error.message


def test_bad_regexes_report_pythons_error() -> None:
    routes = ("            - match:\n"
              "                safe_regex: '^/(a'\n"
              "                headers: [{name: x, safe_regex: '[z'}]\n"
              "                query_parameters: [{name: q, safe_regex: '*'}]\n"
              "              route: {cluster: web}\n")
    found = errors(http_listener(routes=routes))
    assert [(e.line, e.path) for e in found] == [
        (11, "listeners[0].http.virtual_hosts[0].routes[0].match.safe_regex"),
        (12, "listeners[0].http.virtual_hosts[0].routes[0].match.headers[0].safe_regex"),
        (13, "listeners[0].http.virtual_hosts[0].routes[0].match.query_parameters[0].safe_regex"),
    ]
    assert found[0].column == 29
    assert found[0].message == "invalid regular expression: missing ), unterminated subpattern at position 2"
    assert all(e.message.startswith("invalid regular expression: ") for e in found)


def test_route_needs_exactly_one_action_and_one_path_match() -> None:
    routes = ("            - match: {prefix: /, path: /x}\n"
              "              direct_response: {status: 200}\n"
              "              redirect: {https_redirect: true}\n"
              "            - match: {headers: [{name: a, exact: b, present: true}]}\n")
    found = errors(http_listener(routes=routes))
    assert [(e.line, e.column, e.path, e.message) for e in found] == [
        (10, 34, "listeners[0].http.virtual_hosts[0].routes[0].match.path",
         "expected exactly one of prefix, path, safe_regex; found prefix and path"),
        (12, 15, "listeners[0].http.virtual_hosts[0].routes[0].redirect",
         "expected exactly one of route, direct_response, redirect; found direct_response and redirect"),
        (13, 15, "listeners[0].http.virtual_hosts[0].routes[1]",
         "expected exactly one of route, direct_response, redirect; found none"),
        (13, 22, "listeners[0].http.virtual_hosts[0].routes[1].match",
         "expected exactly one of prefix, path, safe_regex; found none"),
        (13, 53, "listeners[0].http.virtual_hosts[0].routes[1].match.headers[0].present",
         "expected at most one of exact, prefix, suffix, contains, safe_regex, present; found exact and present"),
    ]


def test_duplicate_names_and_addresses() -> None:
    text = textwrap.dedent("""\
        admin: {address: 127.0.0.1:9901}
        listeners:
          - {name: a, address: 127.0.0.1:10000, http: {stat_prefix: a}}
          - {name: a, address: 127.0.0.1:10000, http: {stat_prefix: b}}
          - {name: b, address: 127.0.0.1:9901, http: {stat_prefix: c}}
          - {name: c, address: 127.0.0.1:0, http: {stat_prefix: d}}
          - {name: d, address: 127.0.0.1:0, http: {stat_prefix: e}}
        clusters:
          - {name: x, endpoints: ['127.0.0.1:1']}
          - {name: x, endpoints: ['127.0.0.1:2']}
        """)
    found = errors(text)
    assert [(e.line, e.column, e.path, e.message) for e in found] == [
        (4, 12, "listeners[1].name", "duplicate listener name 'a' (first used on line 3)"),
        (4, 24, "listeners[1].address", "address 127.0.0.1:10000 is already used by listener 'a'"),
        (5, 24, "listeners[2].address", "address 127.0.0.1:9901 is already used by the admin interface"),
        (10, 12, "clusters[1].name", "duplicate cluster name 'x' (first used on line 9)"),
    ]


def test_workers() -> None:
    assert load("workers: auto\n")["workers"] == "auto"
    assert load("workers: 4\n")["workers"] == 4
    assert only_error("workers: 0\n").message == "must be at least 1, got 0"
    assert only_error("workers: lots\n").message == "expected an integer or 'auto', got the string 'lots'"


def test_static_cluster_needs_endpoints_but_dns_may_wait() -> None:
    error = only_error("clusters:\n  - name: c\n    endpoints: []\n")
    assert (error.line, error.column, error.path, error.message) == (3, 16, "clusters[0].endpoints", "must not be an empty list")
    assert load("clusters:\n  - {name: c, discovery: dns}\n")["clusters"][0]["endpoints"] == []


def test_access_log_filter_is_validated_and_normalised() -> None:
    registry = make_registry(("filters.http", "router"), ("access_loggers", "file", obj(path={"type": "string"})))
    extra_listener = (
        "    access_log:\n"
        "      - name: file\n"
        "        config: {path: /dev/stdout}\n"
        "        filter: {status_code: {ge: 400}, duration: {ge: 250ms}, sampling: 50, header: {name: x-debug}}\n"
    )
    text = http_listener().replace("    http:\n", extra_listener + "    http:\n", 1)
    log = load(text, registry)["listeners"][0]["access_log"][0]
    assert log == {
        "name": "file",
        "config": {"path": "/dev/stdout"},
        "filter": {"status_code": {"ge": 400}, "duration": {"ge": 0.25}, "sampling": 50,
                   "header": {"name": "x-debug", "invert_match": False}},
    }
    bad = text.replace("ge: 400", "gte: 400").replace("sampling: 50", "sampling: 150")
    found = errors(bad, registry)
    assert [(e.path, e.message) for e in found] == [
        ("listeners[0].access_log[0].filter.status_code.gte", "unknown field 'gte' (did you mean 'ge'?)"),
        ("listeners[0].access_log[0].filter.sampling", "must be at most 100, got 150"),
    ]


# -- normalisation ---------------------------------------------------------------

def _plain(value: Any) -> bool:
    """True when ``value`` holds only builtin types (no ruamel subclasses)."""
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if type(value) is list:
        return all(_plain(v) for v in value)
    return type(value) in (str, int, float, bool, type(None))


def test_normalised_defaults_and_shapes() -> None:
    routes = ("            - match: {prefix: /}\n"
              "              route: {cluster: web, retry_policy: {retry_on: [5xx]}}\n"
              "            - {match: {path: /r}, redirect: {path_redirect: /x}}\n")
    config = load(http_listener(routes=routes).replace("endpoints: ['127.0.0.1:8080']",
                                                       "endpoints: ['127.0.0.1:8080', {address: '[::1]:81', weight: 3}]"))
    assert _plain(config)
    listener = config["listeners"][0]
    assert (listener["host"], listener["port"], listener["per_connection_buffer_limit"]) == ("127.0.0.1", 10000, 1048576)
    http = listener["http"]
    assert http["codec"] == "auto"
    assert (http["request_headers_timeout"], http["idle_timeout"]) == (10.0, 300.0)
    assert "request_timeout" not in http
    assert (http["max_request_headers_kb"], http["max_headers_count"], http["xff_num_trusted_hops"]) == (60, 100, 0)
    assert (http["generate_request_id"], http["use_remote_address"], http["server_name"]) == (True, False, "outrider")
    assert http["filters"] == [{"name": "router", "config": {}}]
    route, redirect = http["virtual_hosts"][0]["routes"]
    assert route["route"]["timeout"] == 15.0
    assert route["route"]["retry_policy"] == {"retry_on": ["5xx"], "num_retries": 1}
    assert route["match"]["case_sensitive"] is True
    assert redirect["redirect"]["response_code"] == 301
    cluster = config["clusters"][0]
    assert cluster["endpoints"] == [
        {"address": "127.0.0.1:8080", "host": "127.0.0.1", "port": 8080, "weight": 1},
        {"address": "[::1]:81", "host": "::1", "port": 81, "weight": 3},
    ]
    assert (cluster["connect_timeout"], cluster["idle_timeout"], cluster["protocol"]) == (5.0, 60.0, "http1")
    assert cluster["lb_policy"] == {"name": "round_robin", "config": {}}


def test_header_append_defaults_to_true() -> None:
    routes = ("            - match: {prefix: /}\n"
              "              route: {cluster: web}\n"
              "              request_headers_to_add: [{name: a, value: '1'}, {name: b, value: '2', append: false}]\n")
    added = load(http_listener(routes=routes))["listeners"][0]["http"]["virtual_hosts"][0]["routes"][0]["request_headers_to_add"]
    assert added == [{"name": "a", "value": "1", "append": True}, {"name": "b", "value": "2", "append": False}]


def _example_registry() -> Registry:
    tcp = Extension(name="tcp_proxy", category="filters.network", factory=_factory, listener_protocol="tcp",
                    schema={**obj(cluster={"type": "string"}, idle_timeout=DURATION), "required": ["cluster"]})
    kafka = Extension(
        name="kafka", category="codecs", factory=_factory, listener_protocol="kafka",
        schema={**obj(cluster={"type": "string"}, stat_prefix={"type": "string"}, advertised_host={"type": "string"},
                      broker_port_base={"type": "integer", "minimum": 1, "maximum": 65535},
                      topic_routes={"type": "array", "items": obj(prefix={"type": "string"}, cluster={"type": "string"})}),
                "required": ["cluster"]},
    )
    return make_registry(
        tcp, kafka,
        ("codecs", "http1", obj()),
        ("stats_sinks", "prometheus", obj()),
        ("stats_sinks", "statsd", {**obj(address=ADDRESS, flush_interval=DURATION, prefix={"type": "string"}),
                                   "required": ["address"]}),
        ("tracers", "zipkin", obj(collector={"type": "string"}, service_name={"type": "string"})),
        ("filters.http", "local_ratelimit", obj(tokens={"type": "integer", "minimum": 1}, fill_interval=DURATION,
                                                stat_prefix={"type": "string"})),
        ("filters.http", "cors", obj(allow_origins={"type": "array", "items": {"type": "string"}})),
        ("filters.http", "router", obj(suppress_envoy_headers={"type": "boolean"})),
        ("access_loggers", "file", obj(path={"type": "string"}, format={"type": "string"})),
        ("load_balancers", "least_request", obj()),
        ("load_balancers", "round_robin", obj()),
        ("health_checkers", "http", obj(path={"type": "string"},
                                        expected_statuses={"type": "array", "items": {"type": "integer"}})),
    )


@pytest.mark.skipif(not EXAMPLE.exists(), reason=f"{EXAMPLE} is not beside this checkout")
def test_the_reference_example_validates_and_normalises() -> None:
    config = load_config(str(EXAMPLE), _example_registry())  # raises ConfigInvalid on any error
    assert _plain(config)
    assert config["admin"] == {"address": "127.0.0.1:9901", "host": "127.0.0.1", "port": 9901}
    assert config["stats"]["sinks"] == [
        {"name": "prometheus", "config": {}},
        {"name": "statsd", "config": {"address": "127.0.0.1:8125", "flush_interval": "5s", "prefix": "outrider"}},
    ]
    assert config["tracing"]["provider"]["name"] == "zipkin" and config["tracing"]["sampling"] == 100
    web, postgres, kafka = config["listeners"]
    assert (web["host"], web["port"]) == ("0.0.0.0", 10000)
    http = web["http"]
    assert (http["request_headers_timeout"], http["idle_timeout"]) == (10.0, 300.0)
    assert [f["name"] for f in http["filters"]] == ["local_ratelimit", "cors", "router"]
    assert http["filters"][0]["config"]["fill_interval"] == "1s"  # extension config as written
    assert http["filters"][2] == {"name": "router", "config": {}}
    api_routes = http["virtual_hosts"][0]["routes"]
    assert api_routes[0]["route"]["timeout"] == 15.0  # the default
    weighted = api_routes[1]["route"]
    assert (weighted["timeout"], weighted["retry_policy"]["per_try_timeout"], weighted["retry_policy"]["num_retries"]) == (15.0, 2.0, 2)
    assert api_routes[1]["per_filter_config"] == {"local_ratelimit": {"tokens": 10, "fill_interval": "1s"}}
    assert web["access_log"][0]["filter"] == {"status_code": {"ge": 400}}
    assert postgres["tcp"] == {"cluster": "postgres", "idle_timeout": "1h"}
    assert kafka["kafka"]["topic_routes"] == [{"prefix": "audit.", "cluster": "kafka_audit"}]
    api = config["clusters"][0]
    assert api["lb_policy"] == {"name": "least_request", "config": {}}
    assert api["connect_timeout"] == 1.0 and api["idle_timeout"] == 60.0
    assert api["endpoints"][1] == {"address": "127.0.0.1:8081", "host": "127.0.0.1", "port": 8081, "weight": 2}
    assert api["health_check"] == {
        "name": "http", "config": {"path": "/healthz", "expected_statuses": [200]},
        "interval": 5.0, "timeout": 1.0, "unhealthy_threshold": 3, "healthy_threshold": 2,
    }
    assert api["outlier_detection"]["base_ejection_time"] == 30.0
    assert config["clusters"][1]["lb_policy"] == {"name": "round_robin", "config": {}}


@pytest.mark.skipif(not EXAMPLE.exists(), reason=f"{EXAMPLE} is not beside this checkout")
def test_the_reference_example_without_its_extensions_names_each_missing_one() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(str(EXAMPLE), make_registry())
    messages = [e.message for e in info.value.errors]
    for category, name in [("stats_sinks", "prometheus"), ("tracers", "zipkin"), ("filters.http", "cors"),
                           ("access_loggers", "file"), ("load_balancers", "least_request"), ("health_checkers", "http")]:
        assert f"unknown {category} extension {name!r} (none installed)" in messages


def unsupported_errors(text: str) -> list[ConfigError]:
    """Errors as ``outrider run`` / ``validate`` report them: with the
    server's list of settings it does not build yet."""
    from outrider.server import UNSUPPORTED

    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, BASIC, source="test.yaml", unsupported=UNSUPPORTED)
    return info.value.errors


@pytest.mark.parametrize("value", ["2", "auto"])
def test_workers_are_built_now(value: str) -> None:
    from outrider.server import UNSUPPORTED

    config = load_config_text(f"workers: {value}\n", BASIC, source="test.yaml", unsupported=UNSUPPORTED)
    assert config["workers"] == (2 if value == "2" else "auto")


def test_documented_but_unbuilt_settings_are_refused_not_ignored() -> None:
    # A tls: block silently served as plain text would be worse than an error.
    text = (
        "workers: 1\n"
        "listeners:\n"
        "  - name: web\n"
        "    address: 127.0.0.1:10000\n"
        "    tls: {certificates: [{cert: a.crt, key: a.key}]}\n"
        "    network_filters: []\n"
        "    http:\n"
        "      stat_prefix: web\n"
        "      virtual_hosts: [{name: all, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: c}}]}]\n"
        "clusters:\n"
        "  - name: c\n"
        "    endpoints: ['127.0.0.1:1']\n"
        "    discovery: static\n"
        "    outlier_detection: {consecutive_5xx: 5}\n"
    )
    found = {(e.path, e.line, e.column): e.message for e in unsupported_errors(text)}
    assert set(found) == {("listeners[0].tls", 5, 5), ("clusters[0].outlier_detection", 14, 5)}
    assert found[("listeners[0].tls", 5, 5)] == (
        "TLS on listeners: not supported yet in this version of outrider; remove this setting"
    )
    # Without the list (the config layer alone), the same text is valid.
    assert load(text)["clusters"][0]["outlier_detection"]["consecutive_5xx"] == 5
