"""Registration, login and guest accounts, and the shape of every error answer."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import httpx
import pytest

from tests.postgres import on_both_databases
from tests.support import PASSWORD, assert_error, bearer, guest, register, unique

# Every test here that uses a server runs on SQLite, then on PostgreSQL.
server = on_both_databases()


def parse_time(value: str) -> datetime:
    assert value.endswith("Z")
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def set_cookies(r: httpx.Response) -> list[str]:
    return r.headers.get_list("set-cookie")


async def test_register_host_returns_user_and_session(api: httpx.AsyncClient) -> None:
    username = unique("Alice")
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    r = await api.post("/api/auth/register", json={"username": username, "password": PASSWORD, "role": "host"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"user_id", "username", "name", "role", "guest", "created_at", "token", "expires_at"}
    assert body["user_id"].startswith("usr_")
    assert body["username"] == username.lower()
    assert body["name"] == username
    assert body["role"] == "host"
    assert body["guest"] is False
    assert isinstance(body["token"], str) and body["token"]
    created = parse_time(body["created_at"])
    assert before <= created
    assert parse_time(body["expires_at"]) > created + timedelta(days=1)

    me = await api.get("/api/me", headers=bearer(body["token"]))
    assert me.status_code == 200
    assert me.json() == {k: body[k] for k in ("user_id", "username", "name", "role", "guest", "created_at")}


async def test_register_sets_httponly_lax_session_cookie(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/register",
                       json={"username": unique("viewer"), "password": PASSWORD, "role": "viewer"})
    assert r.status_code == 201, r.text
    assert r.json()["role"] == "viewer"
    [cookie] = [c for c in set_cookies(r) if c.startswith("livesale_session=")]
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert attrs[0] == f"livesale_session={r.json()['token']}".lower()
    assert "httponly" in attrs
    assert "samesite=lax" in attrs
    assert "path=/" in attrs
    assert "secure" not in attrs
    assert any(a.startswith("max-age=") and int(a.split("=")[1]) > 0 for a in attrs)


async def test_duplicate_username_is_refused_whatever_its_case(api: httpx.AsyncClient) -> None:
    username = unique("dup")
    first = await register(api, "viewer", username=username)
    r = await api.post("/api/auth/register",
                       json={"username": username.upper(), "password": PASSWORD, "role": "host"})
    assert_error(r, 409, "username_taken", "username")
    login = await api.post("/api/auth/login", json={"username": username, "password": PASSWORD})
    assert login.status_code == 200
    assert login.json()["user_id"] == first.user_id
    assert login.json()["role"] == "viewer"


@pytest.mark.parametrize(("body", "field"), [
    ({"username": "validname", "password": PASSWORD, "role": "admin"}, "role"),
    ({"username": "validname", "password": PASSWORD, "role": "HOST"}, "role"),
    ({"username": "validname", "password": PASSWORD}, "role"),
    ({"username": "validname", "password": "short12", "role": "host"}, "password"),
    ({"username": "validname", "password": "x" * 129, "role": "host"}, "password"),
    ({"username": "ab", "password": PASSWORD, "role": "host"}, "username"),
    ({"username": "a" * 33, "password": PASSWORD, "role": "host"}, "username"),
    ({"username": "has space", "password": PASSWORD, "role": "host"}, "username"),
    ({"username": "ünïcode", "password": PASSWORD, "role": "host"}, "username"),
    ({"username": "<script>", "password": PASSWORD, "role": "host"}, "username"),
    ({"password": PASSWORD, "role": "host"}, "username"),
    ({"username": 12345, "password": PASSWORD, "role": "host"}, "username"),
    ({"username": "validname", "password": None, "role": "host"}, "password"),
    ({"username": "validname", "password": 12345678, "role": "host"}, "password"),
    ({"username": "validname", "password": PASSWORD, "role": True}, "role"),
    ({"username": "validname", "password": PASSWORD, "role": "host", "is_admin": True}, "is_admin"),
])
async def test_register_validation_names_the_field(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    r = await api.post("/api/auth/register", json=body)
    assert_error(r, 422, "invalid", field)
    assert not [c for c in set_cookies(r) if c.startswith("livesale_session=")]


async def test_username_with_trailing_newline_is_refused(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/register",
                       json={"username": unique("nl") + "\n", "password": PASSWORD, "role": "viewer"})
    assert_error(r, 422, "invalid", "username")


async def test_body_that_is_not_an_object_is_422(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/register", json=["alice", PASSWORD, "host"])
    assert_error(r, 422, "invalid")


async def test_empty_body_reports_a_missing_field(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/register", content=b"", headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid", "username")


@pytest.mark.parametrize("raw", [b"{", b'{"name": "abc",}', b"{'name': 'abc'}", b'{"name": "a"} trailing',
                                 b"nul", b'{"name": "a"', b'{"name": NaN}'])
async def test_malformed_json_is_400(api: httpx.AsyncClient, raw: bytes) -> None:
    r = await api.post("/api/auth/guest", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "malformed_json")


async def test_body_that_is_not_utf8_is_400(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/guest", content=b'{"name": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert_error(r, 400, "malformed_json")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
async def test_non_json_content_type_is_415(api: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await api.post("/api/auth/guest", content=b'{"name": "Ann"}', headers=headers)
    assert_error(r, 415, "unsupported_media_type")


async def test_json_content_type_with_parameters_is_accepted(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/guest", content=b'{"name": "Ann"}',
                       headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 201, r.text


async def test_body_over_64_kib_is_413(api: httpx.AsyncClient) -> None:
    padding = "x" * (64 * 1024)
    r = await api.post("/api/auth/register",
                       json={"username": "bigbody", "password": PASSWORD, "role": "host", "pad": padding})
    assert_error(r, 413, "too_large")


async def test_chunked_body_over_64_kib_is_413(api: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(17):
            yield b"y" * 4096
        yield b'"}'

    r = await api.post("/api/auth/guest", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "too_large")


async def test_body_just_under_the_limit_is_read(api: httpx.AsyncClient) -> None:
    raw = b'{"name": "Ann"}' + b" " * (64 * 1024 - 16)
    assert len(raw) < 64 * 1024
    r = await api.post("/api/auth/guest", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


async def test_login_returns_the_same_shape_and_a_fresh_session(api: httpx.AsyncClient) -> None:
    username = unique("Bob")
    r = await api.post("/api/auth/register", json={"username": username, "password": PASSWORD, "role": "host"})
    assert r.status_code == 201, r.text
    registered = r.json()
    r = await api.post("/api/auth/login", json={"username": username.upper(), "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == set(registered)
    assert {k: body[k] for k in ("user_id", "username", "name", "role", "guest", "created_at")} == \
           {k: registered[k] for k in ("user_id", "username", "name", "role", "guest", "created_at")}
    assert body["token"] != registered["token"]
    assert any(c.startswith(f"livesale_session={body['token']}") for c in set_cookies(r))
    me = await api.get("/api/me", headers=bearer(body["token"]))
    assert me.json()["user_id"] == registered["user_id"]

    wrong = await api.post("/api/auth/login", json={"username": username, "password": PASSWORD + "!"})
    assert_error(wrong, 401, "bad_credentials")
    assert not set_cookies(wrong)


async def test_login_unknown_user_is_401(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/login", json={"username": unique("nobody"), "password": PASSWORD})
    assert_error(r, 401, "bad_credentials")


async def test_guest_accounts_cannot_log_in(api: httpx.AsyncClient) -> None:
    g = await guest(api, "Gina")
    for password in ("x", PASSWORD):
        r = await api.post("/api/auth/login", json={"username": g.username, "password": password})
        assert_error(r, 401, "bad_credentials")


@pytest.mark.parametrize(("body", "field"), [
    ({"username": "someone"}, "password"),
    ({"password": PASSWORD}, "username"),
    ({"username": "someone", "password": ""}, "password"),
    ({"username": 1, "password": PASSWORD}, "username"),
    ({"username": "someone", "password": PASSWORD, "remember": True}, "remember"),
    ({"username": "some\u0000one", "password": PASSWORD}, "username"),  # PostgreSQL text holds no NUL
])
async def test_login_validation_names_the_field(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    assert_error(await api.post("/api/auth/login", json=body), 422, "invalid", field)


async def test_guest_is_a_viewer_with_a_cleaned_name(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/auth/guest", json={"name": "  Ann\t\u200b Lee \n"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"user_id", "username", "name", "role", "guest", "created_at", "token", "expires_at"}
    assert body["role"] == "viewer"
    assert body["guest"] is True
    assert body["name"] == "Ann Lee"
    assert any(c.startswith("livesale_session=") for c in set_cookies(r))
    me = await api.get("/api/me", headers=bearer(body["token"]))
    assert me.status_code == 200
    assert me.json()["guest"] is True
    assert me.json()["name"] == "Ann Lee"


async def test_guests_get_distinct_accounts(api: httpx.AsyncClient) -> None:
    a, b = await guest(api, "Same"), await guest(api, "Same")
    assert a.user_id != b.user_id
    assert a.username != b.username


@pytest.mark.parametrize("name", ["", "   ", "\u0000\u0001\u0007", "\t\n\r", "\u200b\u200e\u202e", "a" * 33,
                                  "\u3164", "\u2800\u2800", "\u115f", "\u1160 \uffa0", "\u034f", "\ufe0f\ufe0f",
                                  "\u180b", "\U000e0100", "\u0301\u0301"])  # these print as nothing
async def test_guest_name_must_not_be_blank_or_too_long(api: httpx.AsyncClient, name: str) -> None:
    assert_error(await api.post("/api/auth/guest", json={"name": name}), 422, "invalid", "name")


@pytest.mark.parametrize(("body", "field"), [({}, "name"), ({"name": 7}, "name"), ({"name": "Ann", "role": "host"}, "role")])
async def test_guest_body_validation(api: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    assert_error(await api.post("/api/auth/guest", json=body), 422, "invalid", field)


async def test_unknown_route_and_wrong_method_answer_json(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/nothing-here"), 404, "not_found")
    assert_error(await api.delete("/api/auth/guest"), 405, "method_not_allowed")
