"""Rooms: create, list, read, edit, go live and end."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import case, select, update

from server import clock
from server.api.endpoint import Call, Router
from server.catalog import describe_room, describe_rooms, get_owned_room, get_room
from server.errors import Conflict, Unprocessable
from server.ids import looks_like_id, new_id
from server.models import Room
from server.schemas import RoomIn, RoomOut, RoomPatch

router = Router("rooms")

_STATUSES = ("scheduled", "live", "ended")


@router.endpoint("POST", "/api/rooms", auth="host", body=RoomIn, response=RoomOut, status=201)
async def create_room(call: Call[RoomIn]) -> RoomOut:
    """Create a room (hosts only); it starts out scheduled."""
    room = Room(id=new_id("room"), host_id=call.me.user_id, title=call.body.title,
                stream_url=call.body.stream_url, status="scheduled")
    async with call.services.db.begin() as db:
        db.add(room)
        await db.flush()
        return await describe_room(db, room)


@router.endpoint("GET", "/api/rooms", response=list[RoomOut],
                 query=(("status", "only rooms in this state", {"type": "string", "enum": list(_STATUSES)}),
                        ("host_id", "only this host's rooms", {"type": "string"}),
                        ("limit", "how many", {"type": "integer", "minimum": 1, "maximum": 100, "default": 50})))
async def list_rooms(call: Call[None]) -> list[RoomOut]:
    """Rooms, live ones first, then scheduled, then ended; newest first within each."""
    q = call.request.query_params
    stmt = select(Room)
    if (status := q.get("status")) is not None:
        if status not in _STATUSES:
            raise Unprocessable("status must be scheduled, live or ended", field="status")
        stmt = stmt.where(Room.status == status)
    raw_limit = q.get("limit", "50")
    if not (len(raw_limit) <= 3 and raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 100:
        raise Unprocessable("limit must be an integer from 1 to 100", field="limit")
    if (host_id := q.get("host_id")) is not None:
        if not looks_like_id(host_id, "usr"):
            return []
        stmt = stmt.where(Room.host_id == host_id)
    rank = case((Room.status == "live", 0), (Room.status == "scheduled", 1), else_=2)
    stmt = stmt.order_by(rank, Room.created_at.desc(), Room.id).limit(int(raw_limit))
    async with call.services.db() as db:
        return await describe_rooms(db, list((await db.scalars(stmt)).all()))


@router.endpoint("GET", "/api/rooms/{room_id}", response=RoomOut, errors=(404,))
async def read_room(call: Call[None]) -> RoomOut:
    """One room, with its pinned product."""
    async with call.services.db() as db:
        return await describe_room(db, await get_room(db, call.param("room_id")))


@router.endpoint("PATCH", "/api/rooms/{room_id}", auth="host", body=RoomPatch, response=RoomOut,
                 errors=(404,))
async def edit_room(call: Call[RoomPatch]) -> RoomOut:
    """Change the title or stream URL (owner only)."""
    async with call.services.db.begin() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me)
        call.body.apply_to(room)
        out = await describe_room(db, room)
    await call.services.rooms.room_changed(out)
    return out


async def _transition(call: Call[None], target: Literal["live", "ended"]) -> RoomOut:
    async with call.services.db.begin() as db:
        room = await get_owned_room(db, call.param("room_id"), call.me, lock=True)
        for _ in range(3):  # scheduled -> live -> ended at most
            if room.status == target:
                break
            if room.status == "ended":
                raise Conflict("this room has ended; create a new one", code="room_ended")
            # Only from the status just read: SQLite's read above locks nothing, and a start that
            # read "scheduled" must not bring back a room that an end closed meanwhile.
            stamp = {"started_at": clock.utcnow()} if target == "live" else {"ended_at": clock.utcnow()}
            await db.execute(update(Room).where(Room.id == room.id, Room.status == room.status)
                             .values(status=target, **stamp))
            await db.refresh(room)
        out = await describe_room(db, room)
    # Also when repeated: the call that changed the status may have failed after its commit, and
    # each step below is harmless to take twice (viewers may see the same event again).
    if target == "live":
        await call.services.rooms.room_changed(out)
    else:
        await call.services.sales.end_room_sale(out.id)
        await call.services.rooms.room_ended(out)
    return out


@router.endpoint("POST", "/api/rooms/{room_id}/start", auth="host", response=RoomOut, errors=(404, 409))
async def start_room(call: Call[None]) -> RoomOut:
    """Go live (owner only)."""
    return await _transition(call, "live")


@router.endpoint("POST", "/api/rooms/{room_id}/end", auth="host", response=RoomOut, errors=(404, 409))
async def end_room(call: Call[None]) -> RoomOut:
    """End the room (owner only): viewers get `room_ended` and are disconnected."""
    return await _transition(call, "ended")
