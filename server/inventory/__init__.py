"""Flash-sale stock, purchases, orders and the commission ledger."""
