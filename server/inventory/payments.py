"""The payment step behind a small interface, so a real provider can be plugged in.

The flow is authorize -> commit the order in Redis (which keeps the authorization's
reference) -> capture. If the order can no longer be paid (it expired meanwhile),
the authorization is voided, so a buyer is never charged for stock that went back
on sale. If the answer is lost after the commit, the buyer's retry finds the order
paid and captures its reference: a provider must make authorize idempotent per
order and capture idempotent per authorization.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

# The longest we wait for the provider in one call. A request waiting on it holds its buyer (and,
# for a capture, a paid order's answer); past this, an authorize answers 503 (the buyer retries:
# authorize is idempotent per order), a capture stays owed for the jobs process, a void is left
# to lapse.
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Authorization:
    reference: str
    amount_cents: int


class PaymentDeclined(Exception):
    pass


class PaymentProvider(Protocol):
    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        """Hold the amount; raise PaymentDeclined if the buyer cannot pay. Idempotent per order_id."""
        ...

    async def capture(self, auth: Authorization) -> None:
        """Take the held amount. Idempotent: capturing a captured authorization takes nothing more."""
        ...

    async def void(self, auth: Authorization) -> None:
        """Release the hold."""
        ...


class SimulatedPayments:
    """Approves every payment: the demo and the tests pay with this."""

    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        if amount_cents <= 0:
            raise PaymentDeclined("nothing to pay")
        # Idempotent per order, as the interface asks: the same order gets the same reference.
        return Authorization(reference="sim_" + hashlib.sha256(order_id.encode()).hexdigest()[:16],
                             amount_cents=amount_cents)

    async def capture(self, auth: Authorization) -> None:
        return None

    async def void(self, auth: Authorization) -> None:
        return None
