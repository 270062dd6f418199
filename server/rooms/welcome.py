"""What a viewer is shown when it joins, and again after a pub/sub outage (a fresh `welcome` is
the resync): the room read once for everyone welcomed together. Its shared state comes from
Redis, its description from SQL (cached while this process has viewers there, and kept true by
`meta` control messages), its current sale from the inventory layer, through the loaders given."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from server.rooms import protocol
from server.rooms.connection import Connection
from server.rooms.service import room_meta
from server.rooms.store import RoomStore, Snapshot
from server.schemas import RoomOut

META_TTL_S = 5.0

RoomLoader = Callable[[str], Awaitable[RoomOut | None]]  # the room, from SQL; None if there is none
# The room's current sale, as the `sale` event shows it (server.inventory: SaleOut); None if none.
SaleLoader = Callable[[str], Awaitable[object | None]]


@dataclass(frozen=True)
class RoomState:
    """What a welcome shows of a room."""
    snapshot: Snapshot
    meta: dict[str, Any]
    sale: object | None


class Welcomes:
    def __init__(self, store: RoomStore, load_room: RoomLoader, load_sale: SaleLoader) -> None:
        self._store = store
        self._load_room = load_room
        self._load_sale = load_sale
        self._meta: dict[str, tuple[float, dict[str, Any] | None]] = {}  # room -> (read at, meta)

    async def room_meta(self, room_id: str, *, keep: bool) -> dict[str, Any] | None:
        """The room as viewers see it; None if there is no such room. Kept for META_TTL_S if
        `keep` (this process has the room's control messages); read fresh otherwise."""
        cached = self._meta.get(room_id)
        if cached is not None and time.monotonic() - cached[0] < META_TTL_S:
            return cached[1]
        room = await self._load_room(room_id)
        meta = room_meta(room) if room is not None else None
        if keep:
            self._meta[room_id] = (time.monotonic(), meta)
        return meta

    def meta_changed(self, room_id: str, meta: dict[str, Any]) -> None:
        self._meta[room_id] = (time.monotonic(), meta)

    def forget(self, room_id: str) -> None:
        self._meta.pop(room_id, None)

    async def read(self, room_id: str) -> RoomState:
        snap = await self._store.snapshot(room_id)
        meta = await self.room_meta(room_id, keep=True) or {}
        return RoomState(snap, meta, await self._load_sale(room_id))

    @staticmethod
    def frame(conn: Connection, state: RoomState) -> str:
        you = None
        if conn.principal is not None:
            p = conn.principal
            you = {"user_id": p.user_id, "name": p.name, "role": p.role, "is_host": conn.is_host}
        snap = state.snapshot
        event = protocol.Welcome(room=state.meta, you=you, pinned_product=snap.pin, sale=state.sale,
                                 likes=snap.likes,
                                 viewers=protocol.Counts(online=snap.counts.online, peak=snap.counts.peak),
                                 history=snap.history, server_time=int(time.time() * 1000))
        return protocol.batch([protocol.encode(event)])
