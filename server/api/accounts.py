"""Registration, login, guest accounts, logout and /api/me."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import Response

from server import clock
from server.api.endpoint import Call, Router
from server.api.responses import json_response
from server.auth import COOKIE_NAME, DROP_COOKIE, hash_password, verify_password
from server.errors import Conflict, NotFound, Unauthorized
from server.ids import new_id
from server.models import User
from server.ratelimit import LOGIN_PER_IP, REGISTER_PER_IP, Limit, address_key
from server.schemas import AuthOut, GuestIn, LoginIn, RegisterIn, UserOut

router = Router("accounts")


async def _limit_ip(call: Call[Any], limit: Limit) -> None:
    ip = call.request.client.host if call.request.client else "unknown"
    if ip not in call.services.settings.rate_limit_exempt_ips:
        await call.services.limiter.check(limit, address_key(ip))


def user_out(user: User) -> UserOut:
    return UserOut(user_id=user.id, username=user.username, name=user.name, role=user.role,  # type: ignore[arg-type]
                   guest=user.is_guest, created_at=clock.iso(user.created_at) or "")


def _session_response(call: Call[Any], user: User, status: int) -> Response:
    services = call.services
    token = services.sessions.issue(user.id, user.role, user.name)  # type: ignore[arg-type]
    ttl = services.settings.token_ttl_s
    out = AuthOut(**msgspec.structs.asdict(user_out(user)), token=token,
                  expires_at=clock.iso(clock.utcnow() + timedelta(seconds=ttl)) or "")
    response = json_response(out, status)
    _set_cookie(call.request, response, token, ttl, services.settings.cookie_secure)
    return response


def _set_cookie(request: Request, response: Response, token: str, ttl: int, secure: bool) -> None:
    response.set_cookie(COOKIE_NAME, token, max_age=ttl, path="/", httponly=True, samesite="lax",
                        secure=secure or request.url.scheme == "https")


@router.endpoint("POST", "/api/auth/register", body=RegisterIn, response=AuthOut, status=201, errors=(409, 429))
async def register(call: Call[RegisterIn]) -> Response:
    """Create an account (host or viewer) and log it in."""
    await _limit_ip(call, REGISTER_PER_IP)
    body = call.body
    user = User(id=new_id("usr"), username=body.username.lower(), name=body.username, role=body.role,
                password_hash=await hash_password(body.password))
    try:
        async with call.services.db.begin() as db:
            db.add(user)
    except IntegrityError:
        raise Conflict("that username is taken", code="username_taken", field="username") from None
    return _session_response(call, user, 201)


@router.endpoint("POST", "/api/auth/login", body=LoginIn, response=AuthOut, errors=(401, 429))
async def login(call: Call[LoginIn]) -> Response:
    """Log in with username and password (slowed per address and per account against brute force)."""
    await _limit_ip(call, LOGIN_PER_IP)
    username = call.body.username.lower()
    address = address_key(call.request.client.host if call.request.client else "unknown")
    account_spent = await call.services.logins.attempt(username, address)
    async with call.services.db() as db:
        user = await db.scalar(select(User).where(User.username == username))
    ok = await verify_password(user.password_hash if user else None, call.body.password)
    if user is None or not ok:
        raise Unauthorized("wrong username or password", code="bad_credentials")
    await call.services.logins.succeeded(username, address, account_spent)
    return _session_response(call, user, 200)


@router.endpoint("POST", "/api/auth/guest", body=GuestIn, response=AuthOut, status=201, errors=(429,))
async def guest(call: Call[GuestIn]) -> Response:
    """Create a guest viewer account with a display name."""
    await _limit_ip(call, REGISTER_PER_IP)
    user = User(id=new_id("usr"), username=f"guest-{secrets.token_hex(6)}", name=call.body.name,
                role="viewer", password_hash=None)
    async with call.services.db.begin() as db:
        db.add(user)
    return _session_response(call, user, 201)


@router.endpoint("POST", "/api/auth/logout", auth="user", response=dict)
async def logout(call: Call[None]) -> Response:
    """End this session: the token stops working everywhere."""
    await call.services.sessions.revoke(call.me)
    await call.services.rooms.end_session(call.me.session_id)
    return json_response({"status": "logged_out"}, headers={"Set-Cookie": DROP_COOKIE})


@router.endpoint("GET", "/api/me", auth="user", response=UserOut, errors=(404,))
async def me(call: Call[None]) -> UserOut:
    """The current user."""
    async with call.services.db() as db:
        user = await db.get(User, call.me.user_id)
    if user is None:
        raise NotFound("this account no longer exists", code="user_not_found")
    return user_out(user)
