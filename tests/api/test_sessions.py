"""Session tokens, the session cookie, logout, and CSRF checks on cookie-authenticated writes."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from tests.postgres import on_both_databases
from tests.support import (
    PASSWORD,
    TEST_SECRET_KEY,
    Actor,
    ServerProcess,
    api_client,
    assert_error,
    bearer,
    craft_token,
    create_room,
    guest,
    payload_of,
    register,
)

# Every test here that uses a server runs on SQLite, then on PostgreSQL.
server = on_both_databases()

PRODUCT = {"name": "Tea", "price_cents": 1999, "commission_rate_bp": 2000}


@pytest.fixture(scope="module")
async def host(server: ServerProcess) -> Actor:
    async with api_client(server.url) as c:
        return await register(c, "host")


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"livesale_session={token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_me_with_bearer_token(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.get("/api/me", headers=host.auth)
    assert r.status_code == 200
    assert r.json()["user_id"] == host.user_id
    assert r.json()["role"] == "host"


async def test_me_with_session_cookie_header(api: httpx.AsyncClient) -> None:
    g = await guest(api, "Cookie Monster")
    r = await api.get("/api/me", headers=cookie(g.token))
    assert r.status_code == 200
    assert r.json()["user_id"] == g.user_id


async def test_cookie_set_at_guest_login_is_sent_back_by_a_cookie_jar(client: httpx.AsyncClient) -> None:
    g = await guest(client, "Jar")
    r = await client.get("/api/me")
    assert r.status_code == 200
    assert r.json()["user_id"] == g.user_id


async def test_bearer_token_wins_over_the_cookie(api: httpx.AsyncClient, host: Actor) -> None:
    g = await guest(api, "Other")
    r = await api.get("/api/me", headers={**cookie(g.token), **host.auth})
    assert r.json()["user_id"] == host.user_id


async def test_me_without_credentials_is_401(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/me"), 401, "unauthorized")


async def test_token_crafted_with_the_server_key_is_accepted(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.get("/api/me", headers=bearer(craft_token(TEST_SECRET_KEY, payload_of(host, "crafted-session"))))
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == host.user_id


async def test_expired_token_is_401_session_expired(api: httpx.AsyncClient, host: Actor) -> None:
    token = craft_token(TEST_SECRET_KEY, payload_of(host, "crafted-session"), age_s=8 * 24 * 3600)
    assert_error(await api.get("/api/me", headers=bearer(token)), 401, "session_expired")
    assert_error(await api.get("/api/me", headers=cookie(token)), 401, "session_expired")


async def test_token_signed_with_another_key_is_401(api: httpx.AsyncClient, host: Actor) -> None:
    token = craft_token("another-secret-" + "z" * 40, payload_of(host, "crafted-session"))
    assert_error(await api.get("/api/me", headers=bearer(token)), 401, "invalid_token")


async def test_token_with_another_salt_is_401(api: httpx.AsyncClient, host: Actor) -> None:
    token = str(URLSafeTimedSerializer(TEST_SECRET_KEY, salt="some.other.purpose").dumps(payload_of(host, "crafted-session")))
    assert_error(await api.get("/api/me", headers=bearer(token)), 401, "invalid_token")


async def test_viewer_token_edited_to_claim_host_is_401(api: httpx.AsyncClient) -> None:
    g = await guest(api, "Mallory")
    body, stamp, sig = g.token.rsplit(".", 2)
    claims = json.loads(unb64(body))
    assert claims["r"] == "viewer"
    forged = ".".join([b64(json.dumps({**claims, "r": "host"}, separators=(",", ":")).encode()), stamp, sig])
    assert_error(await api.get("/api/me", headers=bearer(forged)), 401, "invalid_token")
    r = await api.post("/api/products", json=PRODUCT, headers=bearer(forged))
    assert_error(r, 401, "invalid_token")


async def test_signature_moved_to_another_payload_is_401(api: httpx.AsyncClient, host: Actor) -> None:
    g = await guest(api, "Splice")
    host_body = host.token.rsplit(".", 2)[0]
    _, stamp, sig = g.token.rsplit(".", 2)
    assert_error(await api.get("/api/me", headers=bearer(f"{host_body}.{stamp}.{sig}")), 401, "invalid_token")


async def test_a_dead_session_cookie_is_dropped_with_its_401(api: httpx.AsyncClient, host: Actor) -> None:
    """Expired, logged out or garbage: the 401 also expires the cookie, so the browser goes on as an
    anonymous viewer (anyone may watch) instead of being refused on every page and socket."""
    expired = craft_token(TEST_SECRET_KEY, payload_of(host, "crafted-session"), age_s=8 * 24 * 3600)
    for token in (expired, "garbage"):
        r = await api.get("/api/me", headers=cookie(token))
        assert r.status_code == 401, r.text
        [dropped] = [c for c in r.headers.get_list("set-cookie") if c.startswith("livesale_session=")]
        attrs = [a.strip().lower() for a in dropped.split(";")]
        assert attrs[0] == "livesale_session=" and "max-age=0" in attrs and "path=/" in attrs, dropped
    r = await api.get("/api/me", headers=bearer(expired))  # a bearer token has no cookie to drop
    assert r.status_code == 401 and not r.headers.get_list("set-cookie"), r.headers


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "", "."])
async def test_garbage_cookie_is_401(api: httpx.AsyncClient, token: str) -> None:
    r = await api.get("/api/me", headers={"Cookie": f"livesale_session={token}"})
    assert_error(r, 401, "invalid_token" if token else "unauthorized")


@pytest.mark.parametrize("value", ["garbage", "Basic dXNlcjpwYXNzd29yZA==", "Token abc.def.ghi", "Bearer",
                                   "Bearer not-a-token", "bearer"])
async def test_malformed_authorization_header_is_401(api: httpx.AsyncClient, host: Actor, value: str) -> None:
    r = await api.get("/api/me", headers={"Authorization": value})
    assert_error(r, 401, "invalid_token")
    r = await api.get("/api/me", headers={"Authorization": value, **cookie(host.token)})
    assert_error(r, 401, "invalid_token")


async def test_bearer_scheme_is_case_insensitive(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.get("/api/me", headers={"Authorization": f"bEaReR {host.token}"})
    assert r.status_code == 200


async def test_logout_revokes_only_that_session(api: httpx.AsyncClient, host: Actor) -> None:
    first = await api.post("/api/auth/login", json={"username": host.username, "password": PASSWORD})
    second = await api.post("/api/auth/login", json={"username": host.username, "password": PASSWORD})
    token, other = first.json()["token"], second.json()["token"]

    r = await api.post("/api/auth/logout", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "logged_out"}
    [cleared] = [c for c in r.headers.get_list("set-cookie") if c.startswith("livesale_session=")]
    attrs = [a.strip().lower() for a in cleared.split(";")]
    assert attrs[0] in ("livesale_session=", 'livesale_session=""')
    assert "max-age=0" in attrs

    assert_error(await api.get("/api/me", headers=bearer(token)), 401, "session_revoked")
    assert_error(await api.get("/api/me", headers=cookie(token)), 401, "session_revoked")
    assert_error(await api.post("/api/products", json=PRODUCT, headers=bearer(token)), 401, "session_revoked")
    assert_error(await api.post("/api/auth/logout", headers=bearer(token)), 401, "session_revoked")

    assert (await api.get("/api/me", headers=bearer(other))).status_code == 200
    assert (await api.get("/api/me", headers=host.auth)).status_code == 200


async def test_logout_without_a_session_is_401(api: httpx.AsyncClient) -> None:
    assert_error(await api.post("/api/auth/logout"), 401, "unauthorized")


async def test_logout_by_cookie_needs_the_own_origin(api: httpx.AsyncClient, server: ServerProcess) -> None:
    g = await guest(api, "Leaving")
    assert_error(await api.post("/api/auth/logout", headers=cookie(g.token)), 403, "csrf")
    r = await api.post("/api/auth/logout", headers={**cookie(g.token), "Origin": "http://evil.example"})
    assert_error(r, 403, "csrf")
    assert (await api.get("/api/me", headers=cookie(g.token))).status_code == 200

    r = await api.post("/api/auth/logout", headers={**cookie(g.token), "Origin": server.url})
    assert r.status_code == 200, r.text
    assert_error(await api.get("/api/me", headers=cookie(g.token)), 401, "session_revoked")


@pytest.mark.parametrize("headers", [
    {},
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": ""},
    {"Origin": "http://127.0.0.1"},
    {"Origin": "http://localhost"},
    {"Referer": "http://evil.example/page"},
    {"Referer": "not a url"},
], ids=["no-origin", "evil", "null", "empty", "other-port", "localhost", "evil-referer", "junk-referer"])
async def test_cookie_write_from_a_foreign_or_unknown_origin_is_403(api: httpx.AsyncClient, host: Actor,
                                                                    headers: dict[str, str]) -> None:
    r = await api.post("/api/products", json=PRODUCT, headers={**cookie(host.token), **headers})
    assert_error(r, 403, "csrf")


async def test_cookie_write_refused_for_lookalike_origins(api: httpx.AsyncClient, host: Actor,
                                                          server: ServerProcess) -> None:
    for origin in (f"https://127.0.0.1:{server.port}", f"http://127.0.0.1:{server.port}.evil.example",
                   f"http://127.0.0.1:{server.port}@evil.example", f"{server.url}/path"):
        r = await api.post("/api/products", json=PRODUCT, headers={**cookie(host.token), "Origin": origin})
        assert_error(r, 403, "csrf")


async def test_cookie_write_from_the_own_origin_succeeds(api: httpx.AsyncClient, host: Actor,
                                                         server: ServerProcess) -> None:
    r = await api.post("/api/products", json=PRODUCT, headers={**cookie(host.token), "Origin": server.url})
    assert r.status_code == 201, r.text
    assert r.json()["host_id"] == host.user_id
    r = await api.post("/api/products", json=PRODUCT,
                       headers={**cookie(host.token), "Origin": f"HTTP://127.0.0.1:{server.port}/"})
    assert r.status_code == 201, r.text


async def test_cookie_write_with_own_referer_and_no_origin_succeeds(api: httpx.AsyncClient, host: Actor,
                                                                    server: ServerProcess) -> None:
    r = await api.post("/api/products", json=PRODUCT,
                       headers={**cookie(host.token), "Referer": f"{server.url}/console?tab=products"})
    assert r.status_code == 201, r.text


async def test_csrf_applies_to_patch_and_room_transitions(api: httpx.AsyncClient, host: Actor,
                                                          server: ServerProcess) -> None:
    room = await create_room(api, host)
    evil = {**cookie(host.token), "Origin": "http://evil.example"}
    assert_error(await api.patch(f"/api/rooms/{room['id']}", json={"title": "Pwned"}, headers=evil), 403, "csrf")
    assert_error(await api.post(f"/api/rooms/{room['id']}/start", headers=evil), 403, "csrf")
    assert_error(await api.post(f"/api/rooms/{room['id']}/end", headers=evil), 403, "csrf")
    assert_error(await api.post("/api/rooms", json={"title": "x"}, headers=evil), 403, "csrf")
    after = (await api.get(f"/api/rooms/{room['id']}")).json()
    assert after["title"] == room["title"]
    assert after["status"] == "scheduled"

    own = {**cookie(host.token), "Origin": server.url}
    r = await api.post(f"/api/rooms/{room['id']}/start", headers=own)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "live"


async def test_bearer_writes_need_no_origin(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.post("/api/products", json=PRODUCT, headers=host.auth)
    assert r.status_code == 201, r.text
    r = await api.post("/api/products", json=PRODUCT,
                       headers={**host.auth, "Origin": "http://evil.example"})
    assert r.status_code == 201, r.text


async def test_cookie_reads_need_no_origin(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.get("/api/products", headers={**cookie(host.token), "Origin": "http://evil.example"})
    assert r.status_code == 200
    assert (await api.get("/api/me", headers=cookie(host.token))).status_code == 200
