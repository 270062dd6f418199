"""/openapi.json: an OpenAPI 3.1 document listing every route with its bodies and error answers."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from tests.support import ServerProcess, api_client

ROUTES = {
    ("get", "/healthz"),
    ("post", "/api/auth/register"),
    ("post", "/api/auth/login"),
    ("post", "/api/auth/guest"),
    ("post", "/api/auth/logout"),
    ("get", "/api/me"),
    ("post", "/api/products"),
    ("get", "/api/products"),
    ("get", "/api/products/{product_id}"),
    ("patch", "/api/products/{product_id}"),
    ("post", "/api/rooms"),
    ("get", "/api/rooms"),
    ("get", "/api/rooms/{room_id}"),
    ("patch", "/api/rooms/{room_id}"),
    ("post", "/api/rooms/{room_id}/start"),
    ("post", "/api/rooms/{room_id}/end"),
}
BODIES = {
    ("post", "/api/auth/register"): "RegisterIn",
    ("post", "/api/auth/login"): "LoginIn",
    ("post", "/api/auth/guest"): "GuestIn",
    ("post", "/api/products"): "ProductIn",
    ("patch", "/api/products/{product_id}"): "ProductPatch",
    ("post", "/api/rooms"): "RoomIn",
    ("patch", "/api/rooms/{room_id}"): "RoomPatch",
}
PURCHASE = ("post", "/api/sales/{sale_id}/purchase")
PUBLIC = {("get", "/healthz"), ("post", "/api/auth/register"), ("post", "/api/auth/login"),
          ("post", "/api/auth/guest"), ("get", "/api/products/{product_id}"), ("get", "/api/rooms"),
          ("get", "/api/rooms/{room_id}")}


@pytest.fixture(scope="module")
async def schema(server: ServerProcess) -> dict[str, Any]:
    async with api_client(server.url) as c:
        r = await c.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = r.json()
    return doc


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, op in item.items():
            yield method, path, op


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_document_header(schema: dict[str, Any]) -> None:
    assert schema["openapi"].startswith("3.1")
    assert schema["info"]["title"] == "livesale"
    assert schema["info"]["version"]
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["components"]["securitySchemes"]["cookie"]["name"] == "livesale_session"


def test_every_route_is_listed(schema: dict[str, Any]) -> None:
    assert ROUTES <= {(m, p) for m, p, _ in operations(schema)}


def test_operation_ids_are_unique_and_ops_are_tagged(schema: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(schema)]
    assert len(ids) == len(set(ids))
    for _, _, op in operations(schema):
        assert op["summary"] and op["tags"]


def test_every_ref_resolves(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    found = list(refs(schema["paths"])) + list(refs(components))
    assert found
    for ref in found:
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in components


def test_request_bodies(schema: dict[str, Any]) -> None:
    for method, path, op in operations(schema):
        if (method, path) in BODIES:
            body = op["requestBody"]
            assert body["required"] is True
            assert body["content"]["application/json"]["schema"] == \
                   {"$ref": f"#/components/schemas/{BODIES[(method, path)]}"}
            assert {"400", "413", "415", "422"} <= set(op["responses"])
        elif (method, path) in ROUTES:
            assert "requestBody" not in op


def test_input_schemas_match_the_validation(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    register = components["RegisterIn"]
    assert set(register["required"]) == {"username", "password", "role"}
    assert register["properties"]["role"]["enum"] == ["host", "viewer"]
    assert register["properties"]["password"]["minLength"] == 8
    product = components["ProductIn"]["properties"]
    assert product["price_cents"]["type"] == "integer" and product["price_cents"]["minimum"] == 1
    assert product["commission_rate_bp"]["maximum"] == 9_500  # with the platform's 5% fee, as the server checks
    for name in ("RegisterIn", "LoginIn", "GuestIn", "ProductIn", "ProductPatch", "RoomIn", "RoomPatch"):
        assert components[name].get("additionalProperties") is False, name


def test_responses_and_errors(schema: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    assert set(schema["components"]["schemas"]["ErrorOut"]["required"]) == {"error", "message"}
    for method, path, op in operations(schema):
        responses = op["responses"]
        success = [s for s in responses if s.startswith("2")]
        if (method, path) == PURCHASE:
            # 201 a new order; 200 the same Idempotency-Key again, with the same body (docs/api.md).
            assert sorted(success) == ["200", "201"]
            assert responses["200"]["content"] == responses["201"]["content"]
            assert responses["201"]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/OrderOut"}
        else:
            assert len(success) == 1
        for status, answer in responses.items():
            assert answer["description"]
            if not status.startswith("2") and (method, path, status) != ("get", "/healthz", "503"):
                assert answer["content"]["application/json"]["schema"] == error_ref
        if (method, path) in PUBLIC:
            assert op["security"] == []
        elif (method, path) in ROUTES:
            assert "security" not in op
            assert {"401", "403"} <= set(responses)
    ops = {(m, p): op for m, p, op in operations(schema)}
    assert "201" in ops[("post", "/api/auth/register")]["responses"]
    assert "409" in ops[("post", "/api/auth/register")]["responses"]
    assert "401" in ops[("post", "/api/auth/login")]["responses"]
    assert "201" in ops[("post", "/api/products")]["responses"]
    assert "201" in ops[("post", "/api/rooms")]["responses"]
    assert "404" in ops[("get", "/api/products/{product_id}")]["responses"]
    assert {"404", "409"} <= set(ops[("post", "/api/rooms/{room_id}/start")]["responses"])
    # /healthz says what failed in its own shape (docs/api.md), and so does openapi.
    health = ops[("get", "/healthz")]["responses"]
    assert health["503"]["content"] == health["200"]["content"]
    assert health["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}


def test_parameters(schema: dict[str, Any]) -> None:
    for _, path, op in operations(schema):
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
    list_rooms = schema["paths"]["/api/rooms"]["get"]
    assert {p["name"] for p in list_rooms["parameters"] if p["in"] == "query"} == {"status", "host_id", "limit"}
    assert "422" in list_rooms["responses"]


def test_patterns_are_ecma_regexes_and_the_purchase_declares_its_key(schema: dict[str, Any]) -> None:
    """JSON Schema reads patterns as ECMA 262, where Python's `\\Z` is a literal Z: a client that
    validated against them refused `alice` and took `aliceZ`. And a generated client must send the
    purchase's Idempotency-Key, or get 400 on every call."""
    patterns: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            patterns.extend(v for k, v in node.items() if k == "pattern" and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)
    assert patterns and not [p for p in patterns if "\\Z" in p], patterns
    username = schema["components"]["schemas"]["RegisterIn"]["properties"]["username"]["pattern"]
    assert username.endswith("$")
    purchase = schema["paths"]["/api/sales/{sale_id}/purchase"]["post"]
    (key,) = [p for p in purchase["parameters"] if p["in"] == "header"]
    assert key["name"] == "Idempotency-Key" and key["required"] is True
    assert (key["schema"]["minLength"], key["schema"]["maxLength"]) == (1, 128)


async def test_a_method_a_path_does_not_serve_gets_405_allowing_every_one_it_does(server: ServerProcess) -> None:
    """The `Allow` of a 405 named only the first route's method for paths served by several."""
    async with api_client(server.url) as c:
        for method, path, allowed in (("DELETE", "/api/rooms/room_x", {"GET", "HEAD", "PATCH"}),
                                      ("PUT", "/api/rooms/room_x/pin", {"POST", "DELETE"}),
                                      ("DELETE", "/api/products", {"GET", "HEAD", "POST"})):
            r = await c.request(method, path)
            assert r.status_code == 405 and r.json()["error"] == "method_not_allowed", r.text
            assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, (path, r.headers["allow"])
