"""Redis key names of the inventory layer. A sale's keys share the hash tag {sale:ID}: the sale's
scripts touch one slot, so they also run on Redis Cluster. A room's sale pointer and launch lock
share the room's tag {room:ID}."""

from __future__ import annotations


def open_sales(deployment: str) -> str:
    """Set of the sale ids one deployment's background jobs still watch."""
    return f"sales:open:{deployment}"


def wakes(deployment: str) -> str:
    """Stream: ids of sales that changed (a purchase, a payment, a launch, an end), for the
    deployment's jobs processes to visit them at once instead of polling every open sale."""
    return f"sales:wakes:{deployment}"


def tag(sale_id: str) -> str:
    return "{sale:" + sale_id + "}"


def sale(sale_id: str) -> str:
    """Hash: the sale's terms, counters (remaining, reserved, paid) and version."""
    return tag(sale_id)


def buyers(sale_id: str) -> str:
    """Hash: user id -> units held (reserved + paid)."""
    return tag(sale_id) + ":buyers"


def idempotency(sale_id: str) -> str:
    """Hash: '<user id>:<Idempotency-Key>' -> order id."""
    return tag(sale_id) + ":idem"


def orders(sale_id: str) -> str:
    """Hash: order id -> order record (JSON)."""
    return tag(sale_id) + ":orders"


def expiry(sale_id: str) -> str:
    """Sorted set: reserved order id -> pay-by time (ms)."""
    return tag(sale_id) + ":expiry"


def captures(sale_id: str) -> str:
    """Sorted set: paid order id -> when to capture its payment if the request that paid has not (ms)."""
    return tag(sale_id) + ":captures"


def log(sale_id: str) -> str:
    """Stream of every state change, read by the persister."""
    return tag(sale_id) + ":log"


def limit(sale_id: str, name: str, subject: str) -> str:
    """String: a rate-limit bucket for purchases in this sale (GCRA, ms)."""
    return tag(sale_id) + f":rl:{name}:{subject}"


def all_keys(sale_id: str) -> list[str]:
    return [sale(sale_id), buyers(sale_id), idempotency(sale_id), orders(sale_id), expiry(sale_id), captures(sale_id),
            log(sale_id)]


def room_sale(room_id: str) -> str:
    """String: the id of the room's current sale (the last launched)."""
    return "{room:" + room_id + "}:sale"


def launching(room_id: str) -> str:
    """String: the room's launch lock, a holder's token with a lease."""
    return "{room:" + room_id + "}:launching"
