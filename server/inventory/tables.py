"""SQL tables of the inventory layer (sales, orders, ledger)."""

from __future__ import annotations
