"""The live server against its own /openapi.json, with schemathesis: requests generated from the
schema (so, valid by it), sent as a host and as a viewer. Fails on any 5xx, any answer whose
status, content type or body the schema does not list, and any 400 or 422 for a request the
schema allows (a refusal the schema could have said: a type, a bound, a pattern), other than
the refusals that depend on state, named below. test_http.py sends what the schema forbids."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.api import openapi
from server.app import ROUTERS
from server.config import Settings
from server.inventory.ledger import max_commission_bp
from tests.reliability.support import LogWindow
from tests.support import PASSWORD, ServerProcess, unique

pytestmark = pytest.mark.reliability

# Per operation, and in the soak (`pytest -m slow`); LIVESALE_SCHEMA_EXAMPLES overrides the first.
EXAMPLES = int(os.environ.get("LIVESALE_SCHEMA_EXAMPLES", "15"))
SOAK_EXAMPLES = 300
# 422s that depend on what exists, not on the request's shape: an Idempotency-Key used before
# with another body.
STATE_REFUSALS = {"key_reused"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServerProcess]:
    """A server of its own, not the session's (conftest's `server`): the generated requests create,
    edit, start and end rooms, products and sales by the hundred, as test_http.py's fuzz does."""
    with ServerProcess(tmp_path_factory.mktemp("schema"), redis_url=redis_url) as s:
        yield s


@pytest.fixture(scope="module")
def log(srv: ServerProcess) -> LogWindow:
    return LogWindow(srv)


@pytest.fixture(scope="module")
def tokens(srv: ServerProcess, log: LogWindow) -> dict[str, str]:
    """A host with a live room and a product, and a viewer: the identities the requests carry."""
    out = {}
    with httpx.Client(base_url=srv.url, trust_env=False, timeout=30) as api:
        for role in ("host", "viewer"):
            r = api.post("/api/auth/register", json={"username": unique(role), "password": PASSWORD, "role": role})
            assert r.status_code == 201, r.text
            out[role] = r.json()["token"]
        auth = {"Authorization": f"Bearer {out['host']}"}
        room = api.post("/api/rooms", json={"title": "Schema"}, headers=auth).json()
        assert api.post(f"/api/rooms/{room['id']}/start", headers=auth).status_code == 200
        assert api.post("/api/products", json={"name": "Tea", "price_cents": 100, "commission_rate_bp": 100},
                        headers=auth).status_code == 201
    return out


# The schema the server builds at start-up with the default settings (the test below checks that
# it is the one served). Built here, not fetched: parametrize needs it when the module is collected.
SCHEMA = openapi.build(ROUTERS, max_commission_bp=max_commission_bp(Settings.platform_fee_bp))


def _schema(examples: int) -> Any:
    loaded = schemathesis.openapi.from_dict(SCHEMA)
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE], max_examples=examples)
    return loaded.exclude(operation_id="logout")  # it would end the session every request carries


schema, soak_schema = _schema(EXAMPLES), _schema(SOAK_EXAMPLES)


def test_the_schema_generated_from_is_the_one_served(srv: ServerProcess) -> None:
    assert httpx.get(srv.url + "/openapi.json", timeout=10, trust_env=False).json() == SCHEMA


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_its_schema_says(case: Any, srv: ServerProcess, tokens: dict[str, str]) -> None:
    answers_as_its_schema_says(case, srv, tokens)


@pytest.mark.slow
@soak_schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_its_schema_says_soak(case: Any, srv: ServerProcess,
                                                         tokens: dict[str, str]) -> None:
    answers_as_its_schema_says(case, srv, tokens)


def test_whole_numbers_sent_as_floats_are_integers(srv: ServerProcess, tokens: dict[str, str]) -> None:
    """25.0 is an integer to JSON Schema, so to the server too; 25.5 is not."""
    auth = {"Authorization": f"Bearer {tokens['host']}"}
    body = {"name": "Floaty", "price_cents": 1999.0, "commission_rate_bp": 100.0}
    r = httpx.post(srv.url + "/api/products", json=body, headers=auth, timeout=10, trust_env=False)
    assert r.status_code == 201 and r.json()["price_cents"] == 1999, r.text
    r = httpx.post(srv.url + "/api/products", json={**body, "price_cents": 1999.5}, headers=auth, timeout=10,
                   trust_env=False)
    assert r.status_code == 422 and r.json()["field"] == "price_cents", r.text


def answers_as_its_schema_says(case: Any, srv: ServerProcess, tokens: dict[str, str]) -> None:
    for role, token in tokens.items():
        response = case.call(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code < 500, (role, response.status_code, response.text)
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                 response_schema_conformance])
        if response.status_code in (400, 422):
            error = response.json().get("error")
            assert error in STATE_REFUSALS, (
                f"a request the schema allows was refused as {role}: {response.status_code} {response.text}")


def test_the_server_logged_no_unhandled_error(log: LogWindow) -> None:
    log.assert_clean()
