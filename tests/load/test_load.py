"""The load generator (load/): a small spike against a real server, the setup hint when the server
rate-limits this address, and the pieces the verdict rests on. No timing assertions."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from load.buyers import BuyContext, Buyer, assign_styles
from load.http import HttpError, Response, Target
from load.messages import Attempt, BuyerMix, BuyerRecord
from load.stats import Histogram, percentile, summary
from load.verify import demand, fold, verdict
from tests.support import REPO, ServerProcess

SPIKE_TIMEOUT_S = 100  # the generator's own bound; the test waits a little longer


def run_load(*args: str, timeout: float = SPIKE_TIMEOUT_S + 15) -> subprocess.CompletedProcess[str]:
    """`python -m load ...` in its own process group, killed whole (workers included) if it overruns."""
    proc = subprocess.Popen([sys.executable, "-m", "load", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"load did not finish in {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_small_spike_passes_and_writes_its_report(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "report"
    with ServerProcess(tmp_path / "server", redis_url=redis_url) as srv:
        done = run_load("spike", "--url", srv.url, "--viewers", "200", "--buyers", "1000", "--stock", "50",
                        "--procs", "2", "--timeout", str(SPIKE_TIMEOUT_S), "--out", str(out))
        server_log = srv.log()
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{server_log}"
    assert "verdict: PASS" in done.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True
    checks = {c["name"]: c["ok"] for c in report["verdict"]["checks"]}
    assert checks == {"buyers_completed": True, "no_oversell": True, "refusals_justified": True,
                      "sold_equals_stock": True, "orders_as_asked": True, "per_user_limit": True,
                      "no_duplicate_orders": True, "answers_match_sold": True, "payments_match": True,
                      "redis_equals_sql": True}
    facts = report["verdict"]["facts"]
    assert facts["sold"] == facts["stock"] == 50
    assert facts["sql_units"] == 50
    assert report["purchases"]["attempts"] >= 1000
    assert report["viewers"]["requested"] == 200
    assert "reserved" in report["purchases"]["latency_ms_by_category"]

    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_spike_spread_over_two_servers_on_a_cluster_passes(tmp_path: Path, cluster_url: str) -> None:
    """`--url A --url B`: the viewers and buyers split over two servers (one deployment: one data
    dir, one SQLite file) on the session's Redis Cluster, as a load balancer would. 50 viewers
    with no --chat-rate: the chat rate follows the audience (5 logged in, 1 message a second)."""
    a = ServerProcess(tmp_path / "shared", redis_url=cluster_url)
    b = ServerProcess(tmp_path / "shared", redis_url=cluster_url)
    with a, b:
        done = run_load("spike", "--url", a.url, "--url", b.url, "--viewers", "50", "--buyers", "300",
                        "--stock", "30", "--timeout", str(SPIKE_TIMEOUT_S), "--no-chart", "--out", str(tmp_path / "r"))
        logs = a.log() + b.log()
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{logs[-4000:]}"
    assert "verdict: PASS" in done.stdout and f"spike against {a.url}, {b.url}" in done.stdout
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["urls"] == [a.url, b.url]
    assert report["verdict"]["facts"]["sql_units"] == 30
    assert "Traceback" not in logs


def test_a_rate_limited_server_gets_a_clear_hint(tmp_path: Path) -> None:
    # Its own engine: draining the per-address sign-up bucket in the shared one would bother other tests.
    with ServerProcess(tmp_path / "server", redis_url=None, env={"LIVESALE_RATE_LIMIT_EXEMPT_IPS": ""}) as srv:
        done = run_load("spike", "--url", srv.url, "--viewers", "10", "--buyers", "40", "--stock", "5",
                        "--chat-rate", "1", "--like-rate", "1", "--logged-in", "0.5", "--no-chart",
                        "--timeout", "60", "--out", str(tmp_path / "report"), timeout=90)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "429" in done.stderr
    assert "LIVESALE_RATE_LIMIT_EXEMPT_IPS=127.0.0.1" in done.stderr
    assert not (tmp_path / "report" / "report.json").exists()


def test_no_server_is_a_setup_error(tmp_path: Path) -> None:
    done = run_load("spike", "--url", "http://127.0.0.1:9", "--no-chart", "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "no server answering" in done.stderr


def test_percentiles_and_the_mergeable_histogram() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 50) == 500.0
    assert percentile(values, 99) == 990.0
    assert summary(values)["max"] == 1000.0
    a, b = Histogram(), Histogram()
    rng = random.Random(7)
    samples = [rng.uniform(0.5, 500) for _ in range(4000)]
    for i, v in enumerate(samples):
        (a if i % 2 else b).add(v)
    a.merge(b)
    assert a.count == 4000
    exact = sorted(samples)
    for q in (50, 95, 99):
        assert abs(a.percentile(q) - percentile(exact, q)) <= 0.011 * percentile(exact, q)


def test_buyer_styles_keep_their_shares() -> None:
    mix = BuyerMix(greedy=0.2, hammer=0.02, double_click=0.1, bulk=0.1, early=0.02)
    styles = assign_styles(1000, mix, random.Random(1))
    assert len(styles) == 1000
    assert styles.count("greedy") == 200 and styles.count("hammer") == 20 and styles.count("normal") == 560


def test_fold_spots_a_key_answered_with_two_orders() -> None:
    records = [BuyerRecord("usr_a", "t", "double_click"), BuyerRecord("usr_b", "t", "bulk")]
    attempts = [
        Attempt(0, "k1", 0, 0.0, 1.0, "reserved", 201, 1, "ord_1"),
        Attempt(0, "k1", 0, 0.0, 1.0, "duplicate", 200, 1, "ord_1"),
        Attempt(1, "k2", 0, 0.0, 1.0, "reserved", 201, 2, "ord_2"),
        Attempt(1, "k2", 1, 0.0, 1.0, "reserved", 201, 2, "ord_3"),  # a retry that reserved again: a bug
        Attempt(1, "k3", 0, 0.0, 1.0, "sold_out", 409, 1),
    ]
    views = fold(records, attempts)
    assert views[0].orders == {"ord_1": 1} and views[0].keys == {"k1": {"ord_1"}}
    assert views[1].keys["k2"] == {"ord_2", "ord_3"} and views[1].units == 4
    assert demand(views, limit=2, greedy_tries=4) == 3


class FakeOrders:
    """Stands in for the server's GET /api/orders: each token's persisted orders."""

    size = 4

    def __init__(self, rows: dict[str, list[dict[str, object]]]) -> None:
        self.rows = rows

    async def request(self, method: str, path: str, *, token: str | None = None, **_: object) -> Response:
        assert (method, path) == ("GET", "/api/orders")
        return Response(200, {}, json.dumps(self.rows.get(token or "", [])).encode())


def _order(order_id: str, quantity: int, status: str = "reserved") -> dict[str, object]:
    return {"order_id": order_id, "sale_id": "sale_x", "status": status, "quantity": quantity}


async def test_the_verdict_fails_on_oversell_and_on_sql_drift() -> None:
    records = [BuyerRecord("usr_a", "ta", "normal"), BuyerRecord("usr_b", "tb", "normal")]
    attempts = [Attempt(0, "k1", 0, 0.0, 1.0, "reserved", 201, 1, "ord_1"),
                Attempt(1, "k2", 0, 0.0, 1.0, "reserved", 201, 1, "ord_2")]
    good_sale = {"id": "sale_x", "stock": 2, "sold": 2, "remaining": 0, "reserved": 2, "paid": 0}
    pool = FakeOrders({"ta": [_order("ord_1", 1)], "tb": [_order("ord_2", 1)]})
    checks, _ = await verdict(pool, good_sale, records, attempts, 2, 4, 1.0, [2, 1, 0])  # type: ignore[arg-type]
    assert all(c.ok for c in checks), checks

    oversold = {**good_sale, "stock": 1, "remaining": -1}
    checks, _ = await verdict(pool, oversold, records, attempts, 2, 4, 1.0, [1, 0, -1])  # type: ignore[arg-type]
    assert {c.name for c in checks if not c.ok} >= {"no_oversell"}

    drifted = FakeOrders({"ta": [_order("ord_1", 1)], "tb": []})  # the persister lost ord_2
    checks, facts = await verdict(drifted, good_sale, records, attempts, 2, 4, 0.6, [0])  # type: ignore[arg-type]
    assert [c.name for c in checks if not c.ok] == ["redis_equals_sql"]
    assert facts["sql_units"] == 1


class ScriptedConnection:
    """Stands in for one buyer's HTTP connection: answers each request with the next scripted
    response (an HttpError is raised, as a timeout is)."""

    def __init__(self, answers: list[Response | HttpError]) -> None:
        self.answers = answers

    async def request(self, method: str, path: str, **_: object) -> Response:
        answer = self.answers.pop(0)
        if isinstance(answer, HttpError):
            raise answer
        return answer


def _error(status: int, code: str) -> Response:
    return Response(status, {"retry-after": "0"}, json.dumps({"error": code, "message": code}).encode())


def _buyer(retries: int = 3) -> Buyer:
    ctx = BuyContext(target=Target("127.0.0.1", 1, "127.0.0.1:1"), sale_id="sale_x", starts_at_ms=0,
                     offset_ms=0.0, limit=2, mix=BuyerMix(retries=retries, timeout_s=1.0),
                     deadline=time.monotonic() + 60)
    return Buyer(ctx, 0, BuyerRecord("usr_a", "t", "normal"), random.Random(1))


TIMEOUT = HttpError("Timeout reading the answer")
ORDER = Response(200, {}, json.dumps({"order_id": "ord_1", "quantity": 1}).encode())


@pytest.mark.parametrize(("answers", "unknown"), [
    ([TIMEOUT, _error(503, "unavailable"), _error(503, "unavailable"), _error(503, "unavailable")], 1),
    ([_error(503, "unavailable")] * 4, 1),  # a 503 after the script may have run it
    ([_error(503, "busy")] * 4, 0),  # shed before the script
    ([TIMEOUT, _error(503, "busy"), _error(503, "busy"), _error(503, "busy")], 1),  # busy settles nothing
    ([TIMEOUT, ORDER], 0),  # the retry got the order the lost answer made
    # A refusal for good settles it (run before, the lost try would have made the retry a 200; run
    # after, it meets the same refusal); a 429 does not (the lost try may still get through).
    ([TIMEOUT, _error(409, "sold_out")], 0),
    ([TIMEOUT, _error(429, "rate_limited"), _error(429, "rate_limited"), _error(429, "rate_limited")], 1),
])
async def test_a_key_stays_unanswered_until_an_answer_settles_it(answers: list[Response | HttpError],
                                                                 unknown: int) -> None:
    buyer = _buyer()
    await buyer.buy(ScriptedConnection(list(answers)), "k1", 2)  # type: ignore[arg-type]
    assert buyer.record.unknown_keys == ({"k1": 2} if unknown else {})


async def test_a_buyer_cut_off_while_backing_off_counts_its_key_unanswered() -> None:
    buyer = _buyer()
    task = asyncio.create_task(buyer.buy(ScriptedConnection([TIMEOUT] * 4), "k1", 1))  # type: ignore[arg-type]
    for _ in range(100):  # until the first try timed out; then it backs off (0.1 s at least)
        if buyer.ctx.attempts:
            break
        await asyncio.sleep(0.001)
    assert buyer.ctx.attempts and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert buyer.record.unknown_keys == {"k1": 1}


async def test_below_demand_nobody_may_be_told_the_stock_ran_short() -> None:
    records = [BuyerRecord("usr_a", "ta", "normal"), BuyerRecord("usr_b", "tb", "normal")]
    attempts = [Attempt(0, "k1", 0, 0.0, 1.0, "reserved", 201, 1, "ord_1"),
                Attempt(1, "k2", 0, 0.0, 1.0, "sold_out", 409, 1)]
    sale = {"id": "sale_x", "stock": 100, "sold": 1, "remaining": 99, "reserved": 1, "paid": 0}
    pool = FakeOrders({"ta": [_order("ord_1", 1)]})
    checks, _ = await verdict(pool, sale, records, attempts, 2, 4, 1.0, [99])  # type: ignore[arg-type]
    assert [c.name for c in checks if not c.ok] == ["refusals_justified", "sold_equals_demand"]


# Found by a review of the verdict: each of these passed it.
async def test_the_verdict_compares_each_order_in_sql_with_its_answer() -> None:
    """Totals alike, orders not: one answered reserved is cancelled in SQL; two answered 1 and 2
    units hold 2 and 1."""
    records = [BuyerRecord("usr_a", "ta", "normal"), BuyerRecord("usr_b", "tb", "bulk")]
    attempts = [Attempt(0, "k1", 0, 0.0, 1.0, "reserved", 201, 1, "ord_1", answered_qty=1),
                Attempt(1, "k2", 0, 0.0, 1.0, "reserved", 201, 2, "ord_2", answered_qty=2)]
    sale = {"id": "sale_x", "stock": 3, "sold": 3, "remaining": 0, "reserved": 3, "paid": 0}
    for rows in ({"ta": [_order("ord_1", 1, "cancelled")], "tb": [_order("ord_2", 2)]},
                 {"ta": [_order("ord_1", 2)], "tb": [_order("ord_2", 1)]}):
        checks, _ = await verdict(FakeOrders(rows), sale, records, attempts, 2, 4, 0.6, [0])  # type: ignore[arg-type]
        assert "redis_equals_sql" in [c.name for c in checks if not c.ok], rows


async def test_a_key_answered_on_one_click_and_lost_on_the_other_leaves_no_room_for_a_second_order() -> None:
    """A double click: one click got the order, the other lost every try. The key is answered, so
    a second order for it in Redis and SQL is a duplicate, not an unanswered key's."""
    records = [BuyerRecord("usr_a", "ta", "double_click", unknown_keys={"k1": 1})]
    attempts = [Attempt(0, "k1", 0, 0.0, 1.0, "reserved", 201, 1, "ord_1", answered_qty=1)]
    sale = {"id": "sale_x", "stock": 2, "sold": 2, "remaining": 0, "reserved": 2, "paid": 0}
    pool = FakeOrders({"ta": [_order("ord_1", 1), _order("ord_2", 1)]})
    checks, facts = await verdict(pool, sale, records, attempts, 2, 4, 0.6, [0])  # type: ignore[arg-type]
    assert facts["unanswered_keys"] == 0
    assert {"answers_match_sold", "redis_equals_sql"} <= {c.name for c in checks if not c.ok}


async def test_a_sale_that_refused_everyone_as_ended_fails() -> None:
    records = [BuyerRecord("usr_a", "ta", "normal"), BuyerRecord("usr_b", "tb", "normal")]
    attempts = [Attempt(0, "k1", 0, 0.0, 1.0, "ended", 409, 1), Attempt(1, "k2", 0, 0.0, 1.0, "ended", 409, 1)]
    sale = {"id": "sale_x", "stock": 100, "sold": 0, "remaining": 100, "reserved": 0, "paid": 0}
    checks, _ = await verdict(FakeOrders({}), sale, records, attempts, 2, 4, 0.6, [100])  # type: ignore[arg-type]
    assert [c.name for c in checks if not c.ok] == ["refusals_justified"]


async def test_stock_left_smaller_than_any_order_asked_is_sold_out_enough() -> None:
    """Bulk buyers of 5 units, 33 in stock: 6 orders, then `not_enough` with 3 left. Correct, and
    it failed as "sold 30 of 33"."""
    records = [BuyerRecord(f"usr_{i}", f"t{i}", "bulk") for i in range(8)]
    attempts = [Attempt(i, f"k{i}", 0, 0.0, 1.0, "reserved", 201, 5, f"ord_{i}", answered_qty=5) for i in range(6)]
    attempts += [Attempt(i, f"k{i}", 0, 1.0, 1.0, "not_enough", 409, 5) for i in (6, 7)]
    sale = {"id": "sale_x", "stock": 33, "sold": 30, "remaining": 3, "reserved": 30, "paid": 0}
    pool = FakeOrders({f"t{i}": [_order(f"ord_{i}", 5)] for i in range(6)})
    checks, _ = await verdict(pool, sale, records, attempts, 5, 7, 0.6, [3])  # type: ignore[arg-type]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


async def test_refusals_are_judged_by_what_the_run_shows_afterwards() -> None:
    """A second review found each of these passed: a `limit_exceeded` for a buyer holding nothing,
    a `sold_out` that later reservations belie, an answer no request of ours should get (404), and
    a refused payment."""
    records = [BuyerRecord(f"usr_{i}", f"t{i}", "normal") for i in range(4)]
    base = [Attempt(0, "k0", 0, 0.0, 5.0, "reserved", 201, 1, "ord_0", answered_qty=1),
            Attempt(1, "k1", 0, 300.0, 5.0, "reserved", 201, 1, "ord_1", answered_qty=1)]
    sale = {"id": "sale_x", "stock": 2, "sold": 2, "remaining": 0, "reserved": 2, "paid": 0}
    pool = FakeOrders({"t0": [_order("ord_0", 1)], "t1": [_order("ord_1", 1)]})
    for odd, check in ((Attempt(2, "k2", 0, 50.0, 1.0, "limit_exceeded", 409, 1), "refusals_justified"),
                       (Attempt(3, "k3", 0, 0.0, 1.0, "sold_out", 409, 1), "refusals_justified"),  # ord_1 came after
                       (Attempt(2, "k2", 0, 50.0, 1.0, "http_404_sale_not_found", 404, 1), "refusals_justified"),
                       (Attempt(0, "ord_0", 0, 50.0, 1.0, "http_409_expired", 409, 0, "ord_0", kind="pay"),
                        "payments_match")):
        checks, _ = await verdict(pool, sale, records, base + [odd], 2, 4, 0.6, [0])  # type: ignore[arg-type]
        assert check in [c.name for c in checks if not c.ok], odd
    checks, _ = await verdict(pool, sale, records, base, 2, 4, 0.6, [0])  # type: ignore[arg-type]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


async def test_a_buyer_whose_lost_answer_made_its_order_is_served() -> None:
    """Bulk buyers take 30 of 33 and one is told `not_enough`; a normal buyer's tries all timed out
    but its first one reserved (its order is in SQL): nobody went unserved, the run passes."""
    records = [BuyerRecord(f"usr_{i}", f"t{i}", "bulk") for i in range(7)]
    records.append(BuyerRecord("usr_n", "tn", "normal", unknown_keys={"kn": 1}))
    attempts = [Attempt(i, f"k{i}", 0, 0.0, 1.0, "reserved", 201, 5, f"ord_{i}", answered_qty=5) for i in range(6)]
    attempts += [Attempt(6, "k6", 0, 1.0, 1.0, "not_enough", 409, 5), Attempt(7, "kn", 0, 0.0, 1.0, "timeout", 0, 1)]
    sale = {"id": "sale_x", "stock": 33, "sold": 31, "remaining": 2, "reserved": 31, "paid": 0}
    rows = {f"t{i}": [_order(f"ord_{i}", 5)] for i in range(6)} | {"tn": [_order("ord_n", 1)]}
    checks, facts = await verdict(FakeOrders(rows), sale, records, attempts, 5, 7, 0.6, [2])  # type: ignore[arg-type]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert facts["buyers_unserved"] == 0
