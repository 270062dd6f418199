"""What the parent and its worker processes tell each other (pickled over a Pipe).

Workers send raw observations, never percentiles: the parent merges them, so a
p99 over all processes is a true p99 and not an average of p99s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from load.stats import Histogram


@dataclass(frozen=True)
class BuyerMix:
    """How buyers behave; fractions of the buyers, the rest buy one unit once."""
    greedy: float = 0.2        # buy again after a success, until refused (tries past the limit)
    hammer: float = 0.02       # fire a burst of attempts at once with distinct keys (meets the per-user 429)
    double_click: float = 0.1  # send the same key twice at once (idempotency)
    bulk: float = 0.1          # ask for `limit` units in one order
    early: float = 0.02        # click just before the start (meets not_started), then retry
    pay: float = 0.3           # pay for what they reserved
    spread_s: float = 0.2      # first clicks spread over this long after the start
    retries: int = 3           # same-key retries after a timeout or a dropped connection
    timeout_s: float = 10.0    # per request
    hammer_burst: int = 15


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    url: str
    room_id: str
    run_id: str
    viewers: int
    chatters: int             # of the viewers, how many log in as guests and chat / like
    chat_interval_s: float    # per chatter
    like_interval_s: float    # per chatter
    buyers: int
    mix: BuyerMix
    deadline_s: float         # the worker gives up and reports after this long, whatever happens
    connect_concurrency: int = 64
    observer: bool = True     # one viewer records sale events (stock draining)


@dataclass(frozen=True)
class Go:
    sale_id: str
    starts_at_ms: int         # server clock
    per_user_limit: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    index: int
    viewers_open: int
    clock_offset_ms: float    # server clock minus this process's wall clock
    clock_rtt_ms: float
    setup_s: float


@dataclass(frozen=True)
class Progress:
    index: int
    viewers_open: int
    attempts: int
    buyers_done: int
    reserved: int
    errors: int
    rate_limited: int
    events: int
    chats_sent: int


@dataclass(frozen=True)
class BuyersDone:
    index: int


@dataclass(frozen=True)
class Failed:
    index: int
    message: str
    hint: str = ""


@dataclass
class Attempt:
    """One HTTP purchase (or pay) request as the buyer saw it."""
    buyer: int                # index within the worker
    key: str                  # Idempotency-Key
    try_no: int               # 0 for the first send of this key
    at_ms: float              # when it was sent, epoch ms on the server's clock
    latency_ms: float
    outcome: str              # reserved, duplicate, sold_out, ..., rate_limited, timeout, conn_error, http_<status>
    status: int               # HTTP status, 0 if none came back
    quantity: int
    order_id: str = ""
    kind: str = "purchase"    # or "pay"
    answered_qty: int = 0     # the quantity of the order a 200/201 answered with


@dataclass
class BuyerRecord:
    user_id: str
    token: str
    style: str                # normal, greedy, hammer, double_click, bulk, early
    # Keys (-> quantity asked) with a try that may have run the script (a timeout, a dropped
    # connection, a 5xx other than `busy`) and no 200/201 after it: each may hold an order.
    unknown_keys: dict[str, int] = field(default_factory=dict)
    crashed: str = ""         # the error that stopped this buyer early, if one did
    paid: list[str] = field(default_factory=list)  # order ids paid (200 from /pay)
    unknown_pays: list[str] = field(default_factory=list)  # order ids whose every pay try went unanswered


@dataclass
class ViewerResult:
    connect_ms: list[float] = field(default_factory=list)   # handshake until welcome, per connection
    connect_failures: dict[str, int] = field(default_factory=dict)
    events: list[int] = field(default_factory=list)         # per viewer
    frames: list[int] = field(default_factory=list)         # per viewer
    drops: dict[int, int] = field(default_factory=dict)     # close code -> count, closes we did not ask for
    reconnects: int = 0
    chats_sent: int = 0
    likes_sent: int = 0
    sent_nonces: int = 0
    server_errors: dict[str, int] = field(default_factory=dict)  # `error` events, by code
    receipts: dict[str, int] = field(default_factory=dict)       # nonce -> receipts on other viewers
    danmaku: Histogram = field(default_factory=Histogram)
    danmaku_series: list[tuple[float, float]] = field(default_factory=list)  # observer: (at_ms, latency)
    sale_series: list[tuple[float, int, int]] = field(default_factory=list)  # observer: (at_ms, remaining, sold)
    foreign_chats: int = 0    # chat events that were not ours (someone else in the room)
    chat_send_ms: Histogram = field(default_factory=Histogram)  # how long ws.send() of a chat took
    chats_skipped: int = 0    # chat sends skipped because the sender fell behind its schedule
    last_receipt_ms: float = 0.0  # wall clock of the last chat of ours received (end of the deliveries)
    connect_s: float = 0.0    # wall time to connect all of this worker's viewers
    connected: int = 0        # viewers open when the connect phase ended


@dataclass
class WorkerResult:
    index: int
    clock_offset_ms: float
    viewers: ViewerResult
    buyers: list[BuyerRecord]
    attempts: list[Attempt]
    sent_nonces: list[str]
    setup_s: float
    buy_phase_s: float
    buy_phase_cpu_s: float = 0.0  # this process's CPU time during the buy phase (1.0/s = one core)
    live_s: float = 0.0           # from Go to Stop: chatting, buying, watching
    live_cpu_s: float = 0.0
    buy_phase_cpu_wait_s: float = 0.0  # runnable but waiting for a CPU (the machine was busy)
    loop_lag_ms: Histogram = field(default_factory=Histogram)  # how late a 100 ms timer fired, Go to Stop
