"""Redis key and channel names of a room, in one place.

Every key of a room shares the hash tag {room:ID}, so the room's scripts
touch one slot and also run on Redis Cluster.
"""

from __future__ import annotations

# Session ids logged out anywhere: every process closes its sockets of that session.
SESSIONS_CHANNEL = "livesale:sessions"


def tag(room_id: str) -> str:
    return "{room:" + room_id + "}"


def channel(room_id: str) -> str:
    return tag(room_id) + ":events"


def state(room_id: str) -> str:
    """Hash: `pin` (the pinned product, JSON)."""
    return tag(room_id) + ":state"


def likes(room_id: str) -> str:
    return tag(room_id) + ":likes"


def history(room_id: str) -> str:
    """List of the last 50 chat events (JSON), newest first."""
    return tag(room_id) + ":history"


def chat_count(room_id: str) -> str:
    return tag(room_id) + ":chat_count"


def presence(room_id: str) -> str:
    """Sorted set: connection id -> expiry (ms)."""
    return tag(room_id) + ":presence"


def peak(room_id: str) -> str:
    return tag(room_id) + ":peak"


def unique_viewers(room_id: str) -> str:
    """HyperLogLog of the viewers (user ids) who ever joined."""
    return tag(room_id) + ":uv"


def mutes(room_id: str) -> str:
    """Hash: user id -> muted until (ms)."""
    return tag(room_id) + ":mutes"


def banned_words(room_id: str) -> str:
    """Set of banned words, lower-cased."""
    return tag(room_id) + ":banned"


def done(room_id: str, call_id: str) -> str:
    """A script call's answer, kept 20 s: the call, run again by a retry, answers it again
    instead of doing its work twice."""
    return tag(room_id) + ":done:" + call_id


def like_bucket(room_id: str, user_id: str) -> str:
    """GCRA bucket (gcra.lua): a user's like frames in a room, across processes."""
    return f"{tag(room_id)}:lb:{user_id}"


def chat_limit(room_id: str, user_id: str) -> str:
    """String: a user's chat rate-limit bucket in this room (GCRA, ms)."""
    return f"{tag(room_id)}:rl:chat:{user_id}"


def room_id_of(channel: str) -> str:
    """The room of a channel name (channel(room_id))."""
    return channel[len("{room:"):channel.index("}")]
