"""server.backends.autopipeline.AutoPipeline: the script calls of one event-loop turn share a round trip,
and every call still gets its own answer or its own error.

Against a private real Valkey (started for this module): SCRIPT FLUSH is server-wide, and the
round-trip checks read the server's own counters (INFO stats / commandstats), which other
clients of the session Valkey would disturb.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from load.servers import free_port
from server.backends.autopipeline import AutoPipeline
from server.backends.redis_client import make_redis
from server.backends.redis_link import CLIENT_NAME
from tests.support import valkey

# Counts one call (INCR of KEYS[1]) and answers with its own tag and the count it saw.
TAGGED_INCR = "local n = redis.call('INCR', KEYS[1]) return {ARGV[1], n}"
# Fails on purpose: an error reply, or a runtime error of the script.
ERROR_REPLY = "redis.call('INCR', KEYS[1]) return redis.error_reply('refused ' .. ARGV[1])"
RUNTIME_ERROR = "error('boom ' .. ARGV[1])"
CALL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with valkey(tmp_path_factory.mktemp("valkey-autopipeline")) as url:
        yield url


@pytest.fixture
async def redis(engine_url: str) -> AsyncIterator[Redis]:
    client = make_redis(engine_url, 16)
    try:
        yield client
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()


_open: list[AutoPipeline] = []


def pipeline_for(redis: Redis, max_batch: int = 64) -> AutoPipeline:
    """An AutoPipeline whose connection is closed when the test ends."""
    pipeline = AutoPipeline(redis, max_batch=max_batch)
    _open.append(pipeline)
    return pipeline


@pytest.fixture(autouse=True)
def close_pipelines() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def key() -> str:
    return f"ap:{secrets.token_hex(6)}"


async def run_all(*calls: Any) -> list[Any]:
    """asyncio.gather, bounded in time, with each call's exception as its result."""
    return list(await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), CALL_TIMEOUT_S))


async def stat(redis: Redis, section: str, name: str, field: str | None = None) -> int:
    info = await redis.info(section)
    value = info.get(name, {} if field else 0)
    return int(value.get(field, 0) if field else value)


async def count(redis: Redis, k: str) -> int:
    return int(await redis.get(k) or 0)


async def test_concurrent_calls_each_get_their_own_answer_in_few_round_trips(redis: Redis) -> None:
    n, k = 500, key()
    script = redis.register_script(TAGGED_INCR)
    await redis.script_load(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    reads_before = await stat(redis, "stats", "total_reads_processed")
    evalsha_before = await stat(redis, "commandstats", "cmdstat_evalsha", "calls")

    results = await run_all(*(pipeline.script(script, [k], [f"call-{i}"]) for i in range(n)))

    reads = await stat(redis, "stats", "total_reads_processed") - reads_before
    evalsha = await stat(redis, "commandstats", "cmdstat_evalsha", "calls") - evalsha_before
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert [tag for tag, _ in results] == [f"call-{i}".encode() for i in range(n)]  # each its own answer
    assert sorted(seen for _, seen in results) == list(range(1, n + 1))  # each ran once, none lost
    assert await count(redis, k) == n
    assert evalsha == n
    # One by one, Redis would read each of the n commands separately (n reads); batched, a few
    # reads per pipeline (its bytes arrive in a few chunks) plus the INFO calls.
    assert reads < n // 5, f"{reads} socket reads for {n} calls: the calls were not batched"


async def test_a_lone_call_is_answered_without_waiting_for_company(redis: Redis) -> None:
    k = key()
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    for i in range(3):
        assert await asyncio.wait_for(pipeline.script(script, [k], [i]), CALL_TIMEOUT_S) == [str(i).encode(), i + 1]


async def test_after_script_flush_every_call_succeeds_and_none_runs_twice(redis: Redis) -> None:
    n, k = 60, key()
    tagged = redis.register_script(TAGGED_INCR)
    # A second script in the same batches: each forgotten script is loaded again.
    other_source = TAGGED_INCR + f" -- {secrets.token_hex(4)}"
    other = redis.register_script(other_source)
    pipeline = pipeline_for(redis)
    assert await pipeline.script(tagged, [k], ["warm"]) == [b"warm", 1]  # loaded by the NOSCRIPT path
    assert await redis.script_exists(tagged.sha, other.sha) == [True, False]

    for round_ in range(3):
        await redis.script_flush()
        assert await redis.script_exists(tagged.sha, other.sha) == [False, False]
        before = await count(redis, k)
        results = await run_all(*(pipeline.script(tagged if i % 2 else other, [k], [f"r{round_}-{i}"])
                                  for i in range(n)))
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert [tag for tag, _ in results] == [f"r{round_}-{i}".encode() for i in range(n)]
        assert sorted(seen for _, seen in results) == list(range(before + 1, before + n + 1))
        assert await count(redis, k) == before + n  # a refused EVALSHA ran nothing; each ran once
        assert await redis.script_exists(tagged.sha, other.sha) == [True, True]


async def test_a_failing_script_fails_only_its_own_call(redis: Redis) -> None:
    n, k, bad_k = 40, key(), key()
    good = redis.register_script(TAGGED_INCR)
    refused = redis.register_script(ERROR_REPLY)
    broken = redis.register_script(RUNTIME_ERROR)
    pipeline = pipeline_for(redis)

    def call(i: int) -> Any:
        if i % 10 == 3:
            return pipeline.script(refused, [bad_k], [i])
        if i % 10 == 7:
            return pipeline.script(broken, [bad_k], [i])
        return pipeline.script(good, [k], [i])

    # Twice: once with the scripts unknown to Redis (the NOSCRIPT path), once loaded.
    for _ in range(2):
        results = await run_all(*(call(i) for i in range(n)))
        for i, result in enumerate(results):
            if i % 10 == 3:
                assert isinstance(result, ResponseError) and f"refused {i}" in str(result), (i, result)
            elif i % 10 == 7:
                assert isinstance(result, ResponseError) and f"boom {i}" in str(result), (i, result)
            else:
                assert not isinstance(result, BaseException), (i, result)
                assert result[0] == str(i).encode(), (i, result)
    assert await count(redis, k) == 2 * (n - 8)
    assert await count(redis, bad_k) == 2 * 4  # error_reply after its INCR: each ran once


async def test_a_cancelled_caller_does_not_break_the_others(redis: Redis) -> None:
    n, k = 30, key()
    script = redis.register_script(TAGGED_INCR)
    await redis.script_load(TAGGED_INCR)
    pipeline = pipeline_for(redis)

    # Cancelled while its call waits in the batch for the end of the turn.
    tasks = [asyncio.create_task(pipeline.script(script, [k], [i])) for i in range(n)]
    await asyncio.sleep(0)  # every task has queued its call; the batch is not sent yet
    victims = {0, 7, n - 1}  # the first (which scheduled the flush), one inside, the last
    for i in victims:
        tasks[i].cancel()
    results = await run_all(*tasks)
    for i, result in enumerate(results):
        if i in victims:
            assert isinstance(result, asyncio.CancelledError), (i, result)
        else:
            assert result[0] == str(i).encode(), (i, result)
    # Already in the batch: the script runs all the same (documented), exactly once each.
    assert await count(redis, k) == n

    # Cancelled while its batch is in flight.
    tasks = [asyncio.create_task(pipeline.script(script, [k], [i])) for i in range(n)]
    await asyncio.sleep(0)  # calls queued
    await asyncio.sleep(0)  # the flush ran: the batch is taken, on its way
    tasks[5].cancel()
    results = await run_all(*tasks)
    assert isinstance(results[5], asyncio.CancelledError)
    assert all(results[i][0] == str(i).encode() for i in range(n) if i != 5), results

    # And the pipeline keeps serving.
    assert (await asyncio.wait_for(pipeline.script(script, [k], ["after"]), CALL_TIMEOUT_S))[0] == b"after"
    assert await count(redis, k) == 2 * n + 1


@pytest.mark.parametrize("max_batch", [1, 8])
async def test_calls_beyond_max_batch_all_succeed(redis: Redis, max_batch: int) -> None:
    n, k = 50, key()
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis, max_batch=max_batch)
    await redis.script_flush()  # the first batches also take the NOSCRIPT path, concurrently
    results = await run_all(*(pipeline.script(script, [k], [i]) for i in range(n)))
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert [tag for tag, _ in results] == [str(i).encode() for i in range(n)]
    assert sorted(seen for _, seen in results) == list(range(1, n + 1))
    assert await count(redis, k) == n


@pytest.mark.parametrize("max_batch, calls", [(64, 20), (1, 60)], ids=["one batch", "many batches"])
async def test_a_dead_redis_fails_every_caller(max_batch: int, calls: int) -> None:
    """Against a port nobody listens on, every caller fails with a connection error. With many
    batches at once (max_batch=1) they share each connection attempt instead of queueing for one
    attempt each (CALL_TIMEOUT_S only guards against that hang)."""
    dead = make_redis(f"redis://127.0.0.1:{free_port()}/0", 4)
    try:
        script = dead.register_script(TAGGED_INCR)
        pipeline = pipeline_for(dead, max_batch=max_batch)
        results = await run_all(*(pipeline.script(script, ["k"], [i]) for i in range(calls)))
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await dead.aclose()
        await dead.connection_pool.disconnect()


async def test_a_script_that_cannot_be_loaded_fails_only_its_own_calls(redis: Redis) -> None:
    """A batch with calls whose script Redis refuses to load (a syntax error: NOSCRIPT, then the
    load fails): those calls get the load's error; the batch's other calls keep their answers."""
    k = key()
    good = redis.register_script(TAGGED_INCR)
    await redis.script_load(TAGGED_INCR)
    broken = redis.register_script(f"return {{ -- {secrets.token_hex(4)}")  # never compiles
    pipeline = pipeline_for(redis)

    results = await run_all(*(pipeline.script(broken if i % 3 == 0 else good, [k], [f"c{i}"]) for i in range(30)))

    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, ResponseError), (i, result)
        else:
            assert not isinstance(result, BaseException), (i, result)
            assert result[0] == f"c{i}".encode()
    assert await count(redis, k) == 20


async def test_arguments_that_cannot_be_sent_fail_at_the_call(redis: Redis) -> None:
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    with pytest.raises(TypeError):
        await pipeline.script(script, [key()], [None])
    assert (await pipeline.script(script, [key()], ["fine"]))[0] == b"fine"


async def pipeline_clients(redis: Redis) -> list[int]:
    """Redis's ids of the auto-pipelines' connections (they name themselves)."""
    clients = await redis.client_list()
    return [int(c["id"]) for c in clients if c.get("name") == CLIENT_NAME]


async def kill_pipeline_connections(redis: Redis) -> list[int]:
    """Drop the pipelines' connections, as a Redis restart or a network cut would."""
    ids = await pipeline_clients(redis)
    assert ids, "no auto-pipeline connection to kill"
    for client_id in ids:
        await redis.client_kill_filter(_id=str(client_id))
    return ids


async def test_after_its_connection_drops_the_pipeline_reconnects(redis: Redis) -> None:
    k = key()
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    assert (await pipeline.script(script, [k], ["before"]))[0] == b"before"
    killed = await kill_pipeline_connections(redis)
    results = await run_all(*(pipeline.script(script, [k], [i]) for i in range(20)))
    assert [r[0] for r in results] == [str(i).encode() for i in range(20)], results
    assert await count(redis, k) == 21
    now = await pipeline_clients(redis)
    assert len(now) == 1 and now[0] not in killed  # a new connection


async def test_a_batch_cut_off_in_flight_is_sent_again_and_answered(redis: Redis) -> None:
    """Redis holds the batch (CLIENT PAUSE), its connection is killed before it runs: the calls
    are sent again on a new connection and every caller gets its answer, each run once."""
    n, k = 40, key()
    script = redis.register_script(TAGGED_INCR)
    await redis.script_load(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    await pipeline.script(script, [k], ["connect"])
    # The scripts write: Redis reads them and holds them, unrun, until the pause ends (long enough
    # for the kill to come first; UNPAUSE ends it as soon as the kill is done).
    await redis.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # type: ignore[no-untyped-call]
    try:
        calls = asyncio.ensure_future(run_all(*(pipeline.script(script, [k], [i]) for i in range(n))))
        await asyncio.sleep(0.1)  # the batch is in Redis, waiting
        assert await count(redis, k) == 1  # held, not run
        killed = await kill_pipeline_connections(redis)
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
    results = await calls
    assert [r[0] for r in results] == [str(i).encode() for i in range(n)], results
    assert sorted(seen for _, seen in results) == list(range(2, n + 2))  # each ran once, after the kill
    assert await count(redis, k) == n + 1
    now = await pipeline_clients(redis)
    assert len(now) == 1 and now[0] not in killed  # answered on a new connection


async def test_closing_while_it_connects_leaves_no_connection(redis: Redis) -> None:
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    before = await pipeline_clients(redis)
    call = asyncio.ensure_future(pipeline.script(script, [key()], ["x"]))
    for _ in range(3):  # the batch is flushed and its connection under way
        await asyncio.sleep(0)
    pipeline.close()
    result = (await run_all(call))[0]
    assert isinstance(result, (RedisConnectionError, asyncio.CancelledError)), result
    await asyncio.sleep(0.2)  # let a connection that was mid-handshake finish and close itself
    assert await pipeline_clients(redis) == before


async def test_replies_keep_to_their_callers_across_many_batches_in_flight(redis: Redis) -> None:
    """Batches do not wait for each other on the one connection: replies are matched by order."""
    k = key()
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis, max_batch=3)

    async def wave(w: int) -> list[Any]:
        return await run_all(*(pipeline.script(script, [k], [f"{w}-{i}"]) for i in range(25)))

    waves = await asyncio.gather(*(wave(w) for w in range(8)))
    for w, results in enumerate(waves):
        assert [r[0] for r in results] == [f"{w}-{i}".encode() for i in range(25)], results
    assert await count(redis, k) == 200


async def test_a_closed_pipeline_refuses_calls_and_never_reconnects(redis: Redis) -> None:
    k = key()
    script = redis.register_script(TAGGED_INCR)
    pipeline = pipeline_for(redis)
    assert (await pipeline.script(script, [k], ["open"]))[0] == b"open"
    pipeline.close()
    results = await run_all(*(pipeline.script(script, [k], [i]) for i in range(5)))
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert await count(redis, k) == 1
