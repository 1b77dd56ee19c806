"""Every test here runs twice: with the C accelerator (``_speedups``) and
with the pure-Python code (``OUTRIDER_NO_SPEEDUPS=1``), in this process and in
the proxies the tests start."""

from __future__ import annotations

import pytest

from outrider.extensions.codecs.http1 import client, parser, server

#: What _speedups replaces in parser.py -> the Python reference.
_PYTHON_VERSIONS = {
    "serialize_request_head": "py_serialize_request_head",
    "serialize_response_head": "py_serialize_response_head",
    "_read_fields": "_py_read_fields",
    "_split_head": "_py_split_head",
    "_request_line": "_py_request_line",
}


@pytest.fixture(autouse=True, params=["speedups", "python"])
def implementation(request, monkeypatch):
    """Which implementation the test runs with (set before its proxies start);
    a module can parametrize it indirectly with another value to run once."""
    if request.param == "python":
        monkeypatch.setenv("OUTRIDER_NO_SPEEDUPS", "1")
        for name, python_name in _PYTHON_VERSIONS.items():
            python_version = getattr(parser, python_name)
            for module in (parser, client, server, request.module):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, python_version)
    elif request.param == "speedups" and not parser.SPEEDUPS:
        pytest.skip("the C accelerator is not built (or OUTRIDER_NO_SPEEDUPS is set)")
    return request.param
