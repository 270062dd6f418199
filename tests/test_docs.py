"""The docs say what the code does, for the vocabularies defined once in code: every socket error
code is in docs/protocol.md, every answer of the purchase script in docs/api.md, every setting in
the README's table."""

from __future__ import annotations

import re
from typing import get_args

from server.inventory.records import StockRefusal
from server.rooms import protocol
from tests.support import REPO


def test_every_socket_error_code_is_documented() -> None:
    text = (REPO / "docs" / "protocol.md").read_text()
    missing = [code for code in protocol.ERROR_CODES if f"`{code}`" not in text]
    assert missing == [], f"docs/protocol.md does not list {missing}"


def test_every_purchase_refusal_is_documented() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    missing = [s for s in [*get_args(StockRefusal), "key_reused", "rate_limited"] if f"`{s}`" not in text]
    assert missing == [], f"docs/api.md does not list {missing}"


def test_every_setting_is_in_the_readme() -> None:
    config = (REPO / "server" / "config.py").read_text()
    names = set(re.findall(r'"((?:LIVESALE|REDIS|DATABASE|PROMETHEUS)_[A-Z_]+)"', config))
    readme = (REPO / "README.md").read_text()
    missing = sorted(n for n in names if f"| `{n}` |" not in readme)
    assert names and missing == [], f"README's settings table does not list {missing}"
