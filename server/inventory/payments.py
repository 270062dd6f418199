"""The payment step behind a small interface, so a real provider can be plugged in.

The flow is authorize -> commit the order in Redis -> capture. If the order
can no longer be paid (it expired meanwhile), the authorization is voided, so a
buyer is never charged for stock that went back on sale.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol


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
        """Take the held amount."""
        ...

    async def void(self, auth: Authorization) -> None:
        """Release the hold."""
        ...


class SimulatedPayments:
    """Approves every payment: the demo and the tests pay with this."""

    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        if amount_cents <= 0:
            raise PaymentDeclined("nothing to pay")
        return Authorization(reference=f"sim_{secrets.token_hex(8)}", amount_cents=amount_cents)

    async def capture(self, auth: Authorization) -> None:
        return None

    async def void(self, auth: Authorization) -> None:
        return None
