"""The commission split of a paid order, in integer cents, and earnings queries.

    gmv             = price_cents * quantity
    commission      = gmv * commission_rate_bp // 10000     (the host's share, rounded down)
    referral_share  = commission * referral_share_bp // 10000 when a valid referrer shared the link
    host_commission = commission - referral_share           (so the two always sum to commission)
    platform_fee    = gmv * platform_fee_bp // 10000

Rounding is always down, in integers; the rates are those fixed when the sale launched, and
commission + platform_fee never exceed gmv (check_commission, when a product is priced, and
the launch's own check, with the fee as it is then).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.errors import Unprocessable
from server.inventory.tables import LedgerEntry

PLATFORM_ACCOUNT = "platform"
BP = 10_000  # basis points in a whole


def max_commission_bp(platform_fee_bp: int) -> int:
    """The highest commission a product may pay: with the platform's fee it must fit in the sale."""
    return BP - platform_fee_bp


def check_commission(rate_bp: int, platform_fee_bp: int) -> None:
    if rate_bp > max_commission_bp(platform_fee_bp):
        raise Unprocessable(f"commission_rate_bp can be at most {max_commission_bp(platform_fee_bp)}: the platform "
                            f"takes {platform_fee_bp} bp of each sale", field="commission_rate_bp")


@dataclass(frozen=True)
class Split:
    gmv: int
    commission: int
    host_commission: int
    referral_share: int
    platform_fee: int


def split(price_cents: int, quantity: int, commission_rate_bp: int, platform_fee_bp: int,
          referral_share_bp: int, has_referrer: bool) -> Split:
    gmv = price_cents * quantity
    commission = gmv * commission_rate_bp // BP
    referral = commission * referral_share_bp // BP if has_referrer else 0
    return Split(gmv=gmv, commission=commission, host_commission=commission - referral,
                 referral_share=referral, platform_fee=gmv * platform_fee_bp // BP)


async def totals(db: AsyncSession, account_id: str) -> dict[str, int]:
    rows = await db.execute(select(LedgerEntry.kind, func.sum(LedgerEntry.amount_cents))
                            .where(LedgerEntry.account_id == account_id).group_by(LedgerEntry.kind))
    return {kind: int(total) for kind, total in rows}


async def entries(db: AsyncSession, account_id: str, limit: int = 200) -> list[LedgerEntry]:
    return list((await db.scalars(select(LedgerEntry).where(LedgerEntry.account_id == account_id)
                                  .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
                                  .limit(limit))).all())
