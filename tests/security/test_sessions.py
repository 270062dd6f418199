"""Sessions and handshakes on a private server set up like a deployment: no LIVESALE_SECRET_KEY (it
generates and keeps one), a short session lifetime (LIVESALE_TOKEN_TTL_S=60, the minimum), one extra
allowed origin, and uvicorn's access log on. Cross-site WebSocket hijacking, sockets of expiring
sessions, tokens kept out of the log, and the session cookie's flags."""

from __future__ import annotations

import secrets
import stat
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.reliability.support import LogWindow, access_lines, tokens_in
from tests.rooms.support import chat_text, open_viewer
from tests.support import (
    DB_SESSIONS,
    TEST_SECRET_KEY,
    ServerProcess,
    api_client,
    bearer,
    craft_token,
    create_room,
    eventually,
    guest,
    payload_of,
    redis_db_url,
    register,
)

pytestmark = pytest.mark.reliability

APP_ORIGIN = "http://app.example.com"
TTL_S = 60


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServerProcess]:
    env = {"LIVESALE_SECRET_KEY": "", "LIVESALE_TOKEN_TTL_S": str(TTL_S), "LIVESALE_ALLOWED_ORIGINS": APP_ORIGIN}
    with ServerProcess(tmp_path_factory.mktemp("sessions"), redis_url=redis_db_url(redis_url, DB_SESSIONS), env=env,
                       log_level="info") as proc:
        yield proc


@pytest.fixture(scope="module")
async def api(srv: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(srv.url) as c:
        yield c


@pytest.fixture(scope="module")
def secret(srv: ServerProcess) -> str:
    return (srv.data_dir / "secret_key").read_text().strip()


@pytest.fixture(scope="module")
async def room(api: httpx.AsyncClient) -> dict[str, Any]:
    host = await register(api, "host")
    return await create_room(api, host, title="Handshakes")


# --- the generated key ---------------------------------------------------------------------------------

async def test_a_generated_secret_key_is_private_to_the_server_and_signs_its_sessions(
        srv: ServerProcess, api: httpx.AsyncClient, secret: str) -> None:
    path: Path = srv.data_dir / "secret_key"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert len(secret) >= 32
    user = await guest(api, "Keyed")
    r = await api.get("/api/me", headers=bearer(craft_token(secret, payload_of(user))))
    assert r.status_code == 200 and r.json()["user_id"] == user.user_id, r.text
    forged = craft_token(TEST_SECRET_KEY, payload_of(user))  # a well-known test key
    r = await api.get("/api/me", headers=bearer(forged))
    assert (r.status_code, r.json()["error"]) == (401, "invalid_token"), r.text


# --- cross-site WebSocket hijacking -----------------------------------------------------------------------

REFUSED_ORIGINS = ["null", "http://evil.example", "http://127.0.0.1:{port}.evil.io", "http://app.example.com.evil.io",
                   "https://app.example.com", "http://app.example.com:8080", "http://evil.example/http://app.example.com",
                   "http://app.example.com@evil.example"]


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
async def test_a_foreign_origin_cannot_open_a_socket_with_the_users_cookie(srv: ServerProcess, api: httpx.AsyncClient,
                                                                         room: dict[str, Any], origin: str) -> None:
    victim = await guest(api, "Victim")
    with pytest.raises(InvalidStatus) as info:
        async with open_viewer(srv.url, room["id"], cookie=victim.token, origin=origin.format(port=srv.port),
                               welcome=False):
            pass
    assert info.value.response.status_code == 403  # refused in the handshake: the socket never opened


@pytest.mark.parametrize("origin", [APP_ORIGIN, "HTTP://APP.EXAMPLE.COM:80", "http://127.0.0.1:{port}"])
async def test_the_allowed_and_the_own_origin_open_sockets(srv: ServerProcess, api: httpx.AsyncClient,
                                                          room: dict[str, Any], origin: str) -> None:
    user = await guest(api, "Welcome")
    async with open_viewer(srv.url, room["id"], cookie=user.token, origin=origin.format(port=srv.port)) as v:
        assert v.welcome is not None and v.welcome["you"]["user_id"] == user.user_id
        await v.chat("hello from the app")
        await v.expect(chat_text("hello from the app"))


# --- a session that expires while its socket is open -------------------------------------------------------

async def test_the_socket_of_an_expiring_session_is_closed_with_4401(srv: ServerProcess, api: httpx.AsyncClient,
                                                                     room: dict[str, Any], secret: str) -> None:
    """The server checks open sockets' sessions every 10 s: a token signed 55 s ago (lifetime 60 s) works
    when the socket opens and gets the socket closed with 4401 soon after it expires."""
    user = await guest(api, "Expiring")
    token = craft_token(secret, payload_of(user), age_s=TTL_S - 5)
    async with open_viewer(srv.url, room["id"], token, label="expiring") as v:
        assert v.welcome is not None and v.welcome["you"]["user_id"] == user.user_id
        _, close = await v.expect_close(timeout=40)
        assert close is not None and close.code == 4401, close
    r = await api.get("/api/me", headers=bearer(token))
    assert (r.status_code, r.json()["error"]) == (401, "session_expired"), r.text
    # A fresh session of the same user is not affected.
    fresh = craft_token(secret, payload_of(user))
    async with open_viewer(srv.url, room["id"], fresh) as v:
        assert v.welcome is not None and v.welcome["you"]["user_id"] == user.user_id


# --- tokens stay out of the log ------------------------------------------------------------------------------

async def test_no_session_token_reaches_the_access_log(srv: ServerProcess, api: httpx.AsyncClient,
                                                      room: dict[str, Any]) -> None:
    log = LogWindow(srv)
    tokens = []
    host = await register(api, "host")
    tokens.append(host.token)
    r = await api.post("/api/auth/login", json={"username": host.username, "password": "correct horse battery"})
    tokens.append(r.json()["token"])
    viewer = await guest(api, "Logged")
    tokens.append(viewer.token)
    cookie = {"Cookie": f"livesale_session={viewer.token}"}
    await api.get("/api/me", headers=host.auth)
    await api.get("/api/me", headers=cookie)
    await api.post("/api/products", json={"name": "x", "price_cents": 1, "commission_rate_bp": 0},
                   headers={"Cookie": f"livesale_session={host.token}", "Origin": srv.url})
    await api.get("/api/me", headers=bearer(host.token[:-4] + "AAAA"))  # a refused token is not logged either
    async with open_viewer(srv.url, room["id"], viewer.token) as v:
        await v.ping()
    async with open_viewer(srv.url, room["id"], cookie=host.token, origin=srv.url) as v:
        await v.ping()
    await api.post("/api/auth/logout", headers=bearer(tokens[1]))

    async def logged() -> str | None:
        text = log.text()
        return text if '"POST /api/auth/logout HTTP/1.1" 200' in text else None

    text = await eventually(logged, timeout=10, what="the access log lines")
    lines = access_lines(text)
    assert any('"GET /api/me HTTP/1.1" 200' in line for line in lines), lines  # the access log is on
    assert any(f"/ws/rooms/{room['id']}" in line for line in text.splitlines()), text[-2000:]
    assert tokens_in(text, tokens + [host.token[:-4] + "AAAA"]) == []


# --- the session cookie --------------------------------------------------------------------------------------

def session_cookie(r: httpx.Response) -> dict[str, str | bool]:
    headers = [h for h in r.headers.get_list("set-cookie") if h.startswith("livesale_session=")]
    assert len(headers) == 1, r.headers
    parts = [p.strip() for p in headers[0].split(";")]
    attrs: dict[str, str | bool] = {"value": parts[0].split("=", 1)[1]}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        attrs[k.lower()] = v or True
    return attrs


@pytest.mark.parametrize("https", [False, True], ids=["http", "https behind a proxy"])
async def test_the_session_cookie_is_httponly_lax_and_secure_over_https(api: httpx.AsyncClient, https: bool) -> None:
    headers = {"X-Forwarded-Proto": "https"} if https else {}
    for path, body in [("/api/auth/guest", {"name": "Cookie"}),
                       ("/api/auth/register", {"username": f"cookie{secrets.token_hex(4)}",
                                               "password": "correct horse battery", "role": "viewer"})]:
        r = await api.post(path, json=body, headers=headers)
        assert r.status_code == 201, r.text
        c = session_cookie(r)
        assert c["value"] == r.json()["token"]
        assert c.get("httponly") is True, c
        assert str(c.get("samesite")).lower() == "lax", c
        assert c.get("path") == "/" and c.get("max-age") == str(TTL_S), c
        assert c.get("secure", False) is https, c
    r = await api.post("/api/auth/logout", headers={**bearer(r.json()["token"]), **headers})
    gone = session_cookie(r)
    assert gone["value"] in ("", '""') and gone.get("max-age") == "0", gone
    assert gone.get("httponly") is True and str(gone.get("samesite")).lower() == "lax", gone
