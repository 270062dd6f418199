"""What the rest of the app asks of the room layer: post a chat message, tell a room something,
pin, moderate, end, count. Works from any process: it writes Redis and publishes; every
process's hub delivers to its own viewers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec

from server.auth import Principal
from server.clock import from_ms, iso
from server.errors import Conflict
from server.ids import new_id
from server.ratelimit import CHAT
from server.rooms import protocol
from server.rooms.publisher import Publisher
from server.rooms.store import MAX_MUTES, RoomStore
from server.schemas import ProductOut, RoomOut
from server.text import clean, folded, visible

BANNED_TTL_S = 5.0  # a process reads a room's banned words again after this long, or when told they changed


def room_meta(room: RoomOut) -> dict[str, Any]:
    """A room as viewers see it in `welcome` and `room` events (the pin travels separately)."""
    meta = msgspec.structs.asdict(room)
    meta.pop("pinned_product")
    return msgspec.to_builtins(meta)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Refusal:
    """Why a chat message did not go out, as the sender's `error` event says it."""
    code: str
    message: str
    retry_after_ms: int | None = None


class BannedWords:
    """This process's copy of each room's banned words, as text is compared with them (folded).
    The hub drops a room's copy when a `banned` control message says they changed, and when the
    room has no viewer here any more."""

    def __init__(self, store: RoomStore) -> None:
        self._store = store
        self._words: dict[str, tuple[float, list[str]]] = {}  # room -> (read at, words)

    async def of(self, room_id: str) -> list[str]:
        cached = self._words.get(room_id)
        if cached is not None and time.monotonic() - cached[0] < BANNED_TTL_S:
            return cached[1]
        words = [folded(w) for w in await self._store.banned_words(room_id)]  # also lists saved before NFKC
        self._words[room_id] = (time.monotonic(), words)
        return words

    def forget(self, room_id: str) -> None:
        self._words.pop(room_id, None)


class RoomService:
    def __init__(self, store: RoomStore, publisher: Publisher, banned: BannedWords) -> None:
        self._store = store
        self._publisher = publisher
        self._banned = banned

    async def tell(self, room_id: str, event: Any) -> None:
        await self._publisher.publish(room_id, protocol.to_everyone(event))

    async def _control(self, room_id: str, control: protocol.Control) -> None:
        await self._publisher.publish(room_id, protocol.to_hubs(control))

    async def end_session(self, session_id: str) -> None:
        """Close the sockets of a logged-out session, in every process."""
        await self._publisher.end_session(session_id)

    # --- chat ------------------------------------------------------------------------------
    async def post_chat(self, room_id: str, sender: Principal | None, is_host: bool, text: str) -> Refusal | None:
        """Everything a message must pass (a sender, clean text, the rate limit, the banned words,
        no mute), then the message goes out to the room; a refusal, or None once posted. A refused
        message is told to the host (`chat_rejected`) unless it broke the rules of the protocol."""
        if sender is None:
            return Refusal(protocol.LOGIN_REQUIRED, "sign in to chat")
        text = clean(text)
        if not visible(text) or len(text) > protocol.MAX_TEXT_CHARS:
            return Refusal(protocol.INVALID_TEXT, f"a message has 1 to {protocol.MAX_TEXT_CHARS} characters")
        banned = False
        if not is_host:
            as_compared = folded(text)
            banned = any(word in as_compared for word in await self._banned.of(room_id))
        user = protocol.UserRef(id=sender.user_id, name=sender.name)
        now_ms = int(time.time() * 1000)
        event = protocol.Chat(id=new_id("msg"), user=user, text=text, ts=now_ms)
        rejected = protocol.ChatRejected(user=user, text=text, reason="banned_word" if banned else "muted", ts=now_ms)
        status, n = await self._store.post_chat(room_id, event.id, sender.user_id, protocol.encode(event),
                                                rejected=protocol.encode(rejected), banned=banned, limit=CHAT)
        if status == "rate_limited":
            return Refusal(protocol.RATE_LIMITED, "slow down: at most 2 messages a second", n)
        if status == "banned_word":
            return Refusal(protocol.BANNED_WORD, "your message contains a word this room does not allow")
        if status == "muted":
            return Refusal(protocol.MUTED, f"the host muted you until {iso(from_ms(n))}")
        return None

    async def delete_chat(self, room_id: str, message_id: str) -> bool:
        return await self._store.delete_chat(room_id, message_id, protocol.encode(protocol.ChatDeleted(id=message_id)))

    # --- the room itself -------------------------------------------------------------------
    async def room_changed(self, room: RoomOut) -> None:
        meta = room_meta(room)
        await self._control(room.id, protocol.MetaChanged(room=meta))
        await self.tell(room.id, protocol.RoomUpdate(room=meta))

    async def room_ended(self, room: RoomOut) -> None:
        await self.room_changed(room)
        await self.tell(room.id, protocol.RoomEnded(ts=int(time.time() * 1000)))
        await self._control(room.id, protocol.CloseRoom(code=protocol.NORMAL, reason="room ended"))

    async def pin(self, room_id: str, product: ProductOut) -> None:
        data = msgspec.to_builtins(product)
        await self._store.set_pin(room_id, data)
        await self.tell(room_id, protocol.Pin(product=data))

    async def pinned_edited(self, room_id: str, product: ProductOut) -> None:
        """The pinned product was edited: viewers get a `pin` of it, if it is still pinned."""
        data = msgspec.to_builtins(product)
        await self._store.refresh_pin(room_id, data, protocol.to_everyone(protocol.Pin(product=data)))

    async def unpin(self, room_id: str) -> None:
        await self._store.set_pin(room_id, None)
        await self.tell(room_id, protocol.Unpin())

    async def stats(self, room_id: str) -> dict[str, int]:
        return await self._store.stats(room_id)

    # --- moderation ------------------------------------------------------------------------
    async def mute(self, room_id: str, user_id: str, duration_ms: int) -> int:
        """Mute for `duration_ms` (Redis's clock); the ms timestamp it lasts until."""
        until_ms = await self._store.mute(room_id, user_id, duration_ms)
        if until_ms is None:
            raise Conflict(f"this room holds {MAX_MUTES} mutes already; lift some first", code="too_many_mutes")
        return until_ms

    async def unmute(self, room_id: str, user_id: str) -> bool:
        return await self._store.unmute(room_id, user_id)

    async def mutes(self, room_id: str) -> dict[str, int]:
        return await self._store.mutes(room_id)

    async def banned_words(self, room_id: str) -> list[str]:
        return await self._store.banned_words(room_id)

    async def set_banned_words(self, room_id: str, words: list[str]) -> None:
        await self._store.set_banned_words(room_id, words)
        await self._control(room_id, protocol.BannedChanged())
