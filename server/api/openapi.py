"""/openapi.json, generated from the endpoint declarations and their msgspec types."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from server.api.endpoint import Router, Spec
from server.schemas import ErrorOut

_MESSAGES = {400: "Malformed request", 401: "Not logged in", 403: "Not allowed", 404: "Not found",
             409: "Conflict with the current state", 413: "Body too large", 415: "Body is not JSON",
             422: "Invalid body or query (the `field` names the culprit)", 429: "Too many requests",
             503: "A backend is unavailable"}


def _statuses(spec: Spec) -> list[int]:
    found = set(spec.errors) | {503}
    if spec.auth in ("user", "host", "optional"):
        found.add(401)
    if spec.auth in ("user", "host"):
        found.add(403)  # host-only, or a cookie request from a foreign origin
    if spec.body is not None:
        found |= {400, 413, 415, 422}
    if spec.query:
        found.add(422)
    return sorted(found)


def _ecma_patterns(node: Any) -> Any:
    """The schema with its regexes as JSON Schema reads them (ECMA 262): our validation anchors
    with Python's `\\Z`, which ECMA reads as a literal Z; there, `$` is the end of the text."""
    if isinstance(node, dict):
        return {k: (re.sub(r"\\Z$", "$", v) if k == "pattern" and isinstance(v, str) else _ecma_patterns(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node


def _limit_property(node: Any, name: str, maximum: int) -> None:
    """Set the maximum of every property `name` in the schema (a limit that depends on settings)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict) and isinstance(value.get(name), dict):
                value[name]["maximum"] = maximum
            _limit_property(value, name, maximum)
    elif isinstance(node, list):
        for value in node:
            _limit_property(value, name, maximum)


def build(routers: list[Router], *, max_commission_bp: int = 10_000) -> dict[str, Any]:
    specs = [spec for r in routers for spec, _ in r.specs]
    types: list[Any] = [ErrorOut] + [t for s in specs for t in (s.body, s.response) if t not in (None, dict)]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schemas, components = _ecma_patterns(schemas), _ecma_patterns(components)
    # The server refuses a commission that, with the platform's fee, pays out more than a sale.
    _limit_property(components, "commission_rate_bp", max_commission_bp)
    by_type = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    tags = {spec.name: r.tag for r in routers for spec, _ in r.specs}
    for spec in specs:
        op: dict[str, Any] = {"operationId": spec.name, "summary": spec.summary, "tags": [tags[spec.name]]}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", spec.path)]
        params += [{"name": n, "in": "query", "required": False, "description": d, "schema": schema}
                   for n, d, schema in spec.query]
        params += [{"name": n, "in": "header", "required": True, "description": d, "schema": schema}
                   for n, d, schema in spec.headers]
        if params:
            op["parameters"] = params
        if spec.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": by_type[spec.body]}}}
        if spec.auth == "none":
            op["security"] = []
        elif spec.auth == "optional":
            op["security"] = [{}, {"bearer": []}, {"cookie": []}]
        ok_schema = by_type.get(spec.response, {"type": "object"})
        responses: dict[str, Any] = {
            str(status): {"description": "OK" if status < 400 else _MESSAGES.get(status, "Error"),
                          "content": {"application/json": {"schema": ok_schema}}}
            for status in (spec.status, *spec.also_ok)}
        for status in _statuses(spec):
            if str(status) in responses:  # answered with the success body (/healthz's 503)
                continue
            responses[str(status)] = {"description": _MESSAGES.get(status, "Error"),
                                      "content": {"application/json": {"schema": by_type[ErrorOut]}}}
        op["responses"] = responses
        paths.setdefault(spec.path, {})[spec.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "livesale", "version": "1", "description": "Live-stream shopping API. Money is integer"
                 " cents; times are UTC ISO 8601; every id is opaque."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "livesale_session"},
            },
        },
        "security": [{"bearer": []}, {"cookie": []}],
    }
