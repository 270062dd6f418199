"""What a `load spike` run is asked for (`SpikeConfig`), checked before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from load.messages import BuyerMix
from load.setup import SetupError

CHAT_PER_USER_MAX = 2.0   # the server's per-user danmaku limit (2/s, burst 5)
LIKE_FRAMES_MAX = 20.0    # per connection, before a policy close


# Without --chat-rate / --like-rate, each logged-in viewer chats and likes this often: 20/s
# each in the default room of 1,000 viewers (100 logged in), and in proportion for other sizes.
CHAT_PER_CHATTER = 0.2
LIKES_PER_CHATTER = 0.2


@dataclass(frozen=True)
class SpikeConfig:
    # Several servers: the viewers and buyers are spread over them (one worker process or more
    # each), as a load balancer would; the scene is set up through the first.
    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    viewers: int = 1000
    buyers: int = 5000
    stock: int = 1000
    limit: int = 2
    procs: int = 1
    logged_in: float = 0.1     # share of viewers with a guest account (they chat and like)
    chat_rate: float | None = None  # danmaku per second, whole room (None: follows the audience)
    like_rate: float | None = None  # like frames per second, whole room (None: follows the audience)
    lead_s: int = 3            # the sale starts this long after launch (viewers are already in)
    linger_s: float = 2.0      # keep watching after the last buyer
    timeout_s: float = 300.0   # the run up to the verdict (see --timeout)
    persist_wait_s: float = 30.0
    out: Path = Path(".")
    mix: BuyerMix = field(default_factory=BuyerMix)
    keep_room: bool = False
    chart: bool = True

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def workers(self) -> int:
        """Worker processes: --procs, and at least one per server."""
        return max(self.procs, len(self.urls))

    def chat_per_s(self) -> float:
        return self.chat_rate if self.chat_rate is not None else round(self.chatters() * CHAT_PER_CHATTER, 2)

    def likes_per_s(self) -> float:
        return self.like_rate if self.like_rate is not None else round(self.chatters() * LIKES_PER_CHATTER, 2)

    def check(self) -> None:
        if not self.urls or len(set(self.urls)) != len(self.urls):
            raise SetupError("give each server's --url once")
        if self.viewers < 0 or self.buyers < 0 or self.procs < 1 or self.stock < 1 or not 1 <= self.limit <= 100:
            raise SetupError("viewers/buyers must be >= 0, procs and stock >= 1, limit 1..100")
        m = self.mix
        shares = (m.greedy, m.hammer, m.double_click, m.bulk, m.early, m.pay)
        if not all(0 <= x <= 1 for x in shares) or m.greedy + m.hammer + m.double_click + m.bulk + m.early > 1:
            raise SetupError("buyer shares must be within 0..1, and the styles' shares add up to at most 1")
        if m.retries < 0 or m.timeout_s <= 0 or m.spread_s < 0 or m.hammer_burst < 1:
            raise SetupError("--retries must be >= 0, the request timeout > 0, the spread >= 0")
        if not 10 <= self.timeout_s <= 85_000:  # the sale's reservations must outlast the run (at most a day)
            raise SetupError("--timeout must be within 10..85000 seconds")
        if self.lead_s < 2:
            raise SetupError("--lead-s must be at least 2 (the server rounds the start to whole seconds)")
        chatters, chat, likes = self.chatters(), self.chat_per_s(), self.likes_per_s()
        if chat > 0 and (chatters == 0 or chat / chatters > CHAT_PER_USER_MAX):
            raise SetupError(f"--chat-rate {chat}/s needs at least {math.ceil(chat / 2)} "
                             f"logged-in viewers (the server allows {CHAT_PER_USER_MAX:.0f} messages/s per user); "
                             f"raise --logged-in or --viewers")
        if likes > 0 and (chatters == 0 or likes / chatters > LIKE_FRAMES_MAX / 2):
            raise SetupError(f"--like-rate {likes}/s is too much for {chatters} logged-in viewers")

        if self.chart:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise SetupError("report.png needs matplotlib: pip install 'livesale[load]' (or matplotlib), "
                                 "or pass --no-chart") from None

    def chatters(self) -> int:
        return min(self.viewers, round(self.viewers * self.logged_in)) if self.viewers else 0
