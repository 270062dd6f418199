"""The live room over HTTP: pins, moderation and stats (owner only).

The changes reach viewers as WebSocket events through the room layer.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from sqlalchemy import delete, select

from server import clock
from server.api.endpoint import Call, Router
from server.catalog import describe_room, get_owned_product, get_owned_room, get_room, lineup, product_out
from server.errors import Conflict, NotFound, Unprocessable
from server.ids import looks_like_id
from server.inventory.figures import room_sales_figures
from server.models import Room, RoomProduct, User
from server.rooms.protocol import Lineup
from server.schemas import (
    BannedWordsIn,
    BannedWordsOut,
    DeletedOut,
    LineupIn,
    MuteIn,
    MuteOut,
    PinIn,
    ProductOut,
    RoomOut,
    RoomStatsOut,
)
from server.text import clean, folded

router = Router("live")


async def _owned_open_room(call: Call[Any]) -> Room:
    async with call.services.db() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
    if room.status == "ended":
        raise Conflict("this room has ended", code="room_ended")
    return room


@router.endpoint("POST", "/api/rooms/{room_id}/pin", auth="host", body=PinIn, response=RoomOut,
                 errors=(404, 409))
async def pin(call: Call[PinIn]) -> RoomOut:
    """Pin one of your products in your room; viewers get a `pin` event."""
    async with call.services.db.begin() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
        if room.status == "ended":
            raise Conflict("this room has ended", code="room_ended")
        product = await get_owned_product(db, call.body.product_id, call.me)
        room.pinned_product_id = product.id
        out = await describe_room(db, room)
    await call.services.rooms.pin(room.id, product_out(product))
    return out


@router.endpoint("DELETE", "/api/rooms/{room_id}/pin", auth="host", response=RoomOut, errors=(404,))
async def unpin(call: Call[None]) -> RoomOut:
    """Unpin; viewers get an `unpin` event."""
    async with call.services.db.begin() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
        room.pinned_product_id = None
        out = await describe_room(db, room)
    await call.services.rooms.unpin(room.id)
    return out


@router.endpoint("GET", "/api/rooms/{room_id}/lineup", response=list[ProductOut], errors=(404,))
async def get_lineup(call: Call[None]) -> list[ProductOut]:
    """The products shown in the room, in order."""
    async with call.services.db() as db:
        room = await get_room(db, call.param("room_id"))
        return await lineup(db, room.id)


@router.endpoint("PUT", "/api/rooms/{room_id}/lineup", auth="host", body=LineupIn, response=list[ProductOut],
                 errors=(404,))
async def set_lineup(call: Call[LineupIn]) -> list[ProductOut]:
    """Replace the room's lineup with your products, in this order; viewers get a `lineup` event."""
    ids = list(dict.fromkeys(call.body.product_ids))  # keep order, drop repeats
    async with call.services.db.begin() as db:
        # Locked: two saves at once (a double click) would each delete, then both insert.
        room = await get_owned_room(db, call.param("room_id"), call.me, lock=True)
        for product_id in ids:
            await get_owned_product(db, product_id, call.me)
        await db.execute(delete(RoomProduct).where(RoomProduct.room_id == room.id))
        db.add_all([RoomProduct(room_id=room.id, product_id=pid, position=i) for i, pid in enumerate(ids)])
        await db.flush()
        products = await lineup(db, room.id)
    await call.services.rooms.tell(room.id, Lineup(products=msgspec.to_builtins(products)))
    return products


@router.endpoint("DELETE", "/api/rooms/{room_id}/chat/{message_id}", auth="host", response=DeletedOut,
                 errors=(404, 409))
async def delete_chat(call: Call[None]) -> DeletedOut:
    """Delete a danmaku message; viewers get `chat_deleted`."""
    room = await _owned_open_room(call)
    message_id = call.param("message_id")
    if not looks_like_id(message_id, "msg"):
        raise NotFound("no such message", code="message_not_found")
    found = await call.services.rooms.delete_chat(room.id, message_id)
    return DeletedOut(id=message_id, in_history=found)


@router.endpoint("POST", "/api/rooms/{room_id}/mutes", auth="host", body=MuteIn, response=MuteOut,
                 errors=(404, 409))
async def mute(call: Call[MuteIn]) -> MuteOut:
    """Mute a user in this room for `duration_s` seconds; their messages are refused."""
    room = await _owned_open_room(call)
    if call.body.user_id == call.me.user_id:
        raise Unprocessable("you cannot mute yourself", field="user_id")
    if not looks_like_id(call.body.user_id, "usr"):
        raise Unprocessable("not a user id", field="user_id")
    async with call.services.db() as db:
        if await db.get(User, call.body.user_id) is None:
            raise NotFound("no such user", code="user_not_found")
    until_ms = await call.services.rooms.mute(room.id, call.body.user_id, call.body.duration_s * 1000)
    return (await _mutes_out(call, {call.body.user_id: until_ms}))[0]


async def _mutes_out(call: Call[Any], until_ms: dict[str, int]) -> list[MuteOut]:
    """The mutes with the users' names (the host mutes people by what they said, not by id)."""
    async with call.services.db() as db:
        names = dict((await db.execute(select(User.id, User.name).where(User.id.in_(until_ms)))).tuples().all())
    return [MuteOut(user_id=u, name=names.get(u), until=clock.iso(clock.from_ms(ms)) or "")
            for u, ms in sorted(until_ms.items())]


@router.endpoint("GET", "/api/rooms/{room_id}/mutes", auth="host", response=list[MuteOut], errors=(404,))
async def list_mutes(call: Call[None]) -> list[MuteOut]:
    """Users muted in this room now."""
    async with call.services.db() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
    return await _mutes_out(call, await call.services.rooms.mutes(room.id))


@router.endpoint("DELETE", "/api/rooms/{room_id}/mutes/{user_id}", auth="host", response=MuteOut, errors=(404,))
async def unmute(call: Call[None]) -> MuteOut:
    """Lift a mute."""
    async with call.services.db() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
    user_id = call.param("user_id")
    if not await call.services.rooms.unmute(room.id, user_id):
        raise NotFound("that user is not muted here", code="not_muted")
    return (await _mutes_out(call, {user_id: int(time.time() * 1000)}))[0]


@router.endpoint("GET", "/api/rooms/{room_id}/banned-words", auth="host", response=BannedWordsOut, errors=(404,))
async def get_banned_words(call: Call[None]) -> BannedWordsOut:
    """The room's banned words."""
    async with call.services.db() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
    return BannedWordsOut(words=await call.services.rooms.banned_words(room.id))


@router.endpoint("PUT", "/api/rooms/{room_id}/banned-words", auth="host", body=BannedWordsIn,
                 response=BannedWordsOut, errors=(404,))
async def set_banned_words(call: Call[BannedWordsIn]) -> BannedWordsOut:
    """Replace the banned words (case-insensitive; a message containing one is refused)."""
    async with call.services.db() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
    words = sorted({w for w in (folded(clean(x)) for x in call.body.words) if w})
    await call.services.rooms.set_banned_words(room.id, words)
    return BannedWordsOut(words=words)


@router.endpoint("GET", "/api/rooms/{room_id}/stats", auth="host", response=RoomStatsOut, errors=(404,))
async def stats(call: Call[None]) -> RoomStatsOut:
    """Live figures of your room."""
    async with call.services.db() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
    live = await call.services.rooms.stats(room.id)
    async with call.services.db() as db:
        sales = await room_sales_figures(db, room.id)
    unique = live["unique_viewers"]
    return RoomStatsOut(**live, **sales, conversion=round(sales["buyers"] / unique, 4) if unique else 0.0)
