"""server.ratelimit.Gate: load shedding by purchases in flight per process."""

from __future__ import annotations

import pytest

from server.errors import Unavailable
from server.ratelimit import Gate


def test_past_the_limit_a_call_is_shed_with_busy_and_retry_after_and_a_finished_call_frees_its_place() -> None:
    gate = Gate(2)
    with gate, gate:
        with pytest.raises(Unavailable) as shed:
            with gate:
                pass
        assert shed.value.code == "busy" and shed.value.headers == {"Retry-After": "1"}
        assert gate.inflight == 2  # the shed call took no place
    assert gate.inflight == 0
    with gate:
        assert gate.inflight == 1


def test_a_call_that_fails_frees_its_place() -> None:
    gate = Gate(1)
    with pytest.raises(RuntimeError):
        with gate:
            raise RuntimeError("the call failed")
    assert gate.inflight == 0
