"""What the rest of the app asks of the room layer: tell a room something,
pin, moderate, end, count. Works from any process: it writes Redis and
publishes; every process's hub delivers to its own viewers."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from server.rooms import protocol
from server.rooms.broker import CONTROL, EVERYONE, HOST, Broker
from server.rooms.store import RoomStore
from server.schemas import ProductOut, RoomOut


def room_meta(room: RoomOut) -> dict[str, Any]:
    """A room as viewers see it in `welcome` and `room` events (the pin travels separately)."""
    meta = msgspec.structs.asdict(room)
    meta.pop("pinned_product")
    return msgspec.to_builtins(meta)  # type: ignore[no-any-return]


class RoomService:
    def __init__(self, store: RoomStore, broker: Broker) -> None:
        self.store = store
        self.broker = broker

    async def tell(self, room_id: str, event: Any) -> None:
        await self.broker.publish(room_id, EVERYONE, protocol.encode(event))

    async def tell_host(self, room_id: str, event: Any) -> None:
        await self.broker.publish(room_id, HOST, protocol.encode(event))

    async def _control(self, room_id: str, **control: Any) -> None:
        await self.broker.publish(room_id, CONTROL, msgspec.json.encode(control))

    async def end_session(self, session_id: str) -> None:
        """Close the sockets of a logged-out session, in every process."""
        await self.broker.end_session(session_id)

    async def room_changed(self, room: RoomOut) -> None:
        meta = room_meta(room)
        await self._control(room.id, op="meta", room=meta)
        await self.tell(room.id, protocol.RoomUpdate(room=meta))

    async def room_ended(self, room: RoomOut) -> None:
        await self.room_changed(room)
        await self.tell(room.id, protocol.RoomEnded(ts=int(time.time() * 1000)))
        await self._control(room.id, op="close", code=protocol.NORMAL, reason="room ended")

    async def pin(self, room_id: str, product: ProductOut) -> None:
        data = msgspec.to_builtins(product)
        await self.store.set_pin(room_id, data)
        await self.tell(room_id, protocol.Pin(product=data))

    async def pinned_edited(self, room_id: str, product: ProductOut) -> None:
        """The pinned product was edited: viewers get a `pin` of it, if it is still pinned."""
        data = msgspec.to_builtins(product)
        await self.store.refresh_pin(room_id, data, EVERYONE + protocol.encode(protocol.Pin(product=data)))

    async def unpin(self, room_id: str) -> None:
        await self.store.set_pin(room_id, None)
        await self.tell(room_id, protocol.Unpin())

    async def delete_chat(self, room_id: str, message_id: str) -> bool:
        return await self.store.delete_chat(room_id, message_id, protocol.encode(protocol.ChatDeleted(id=message_id)))

    async def set_banned_words(self, room_id: str, words: list[str]) -> None:
        await self.store.set_banned_words(room_id, words)
        await self._control(room_id, op="banned")
