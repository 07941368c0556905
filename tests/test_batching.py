"""The serving replica's batching: batches form while the model is busy, and a request-log commit
takes every row that waited for it. Pure asyncio: no model, database or cluster."""

import asyncio
import threading

import pytest

from llmops_dagster.serving.batching import BusyBatcher, GroupCommit


class GatedModel:
    """A model whose batches finish only when the test opens the gate; it records each batch."""

    def __init__(self):
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if "boom" in items:
            raise RuntimeError("the model failed on this batch")
        return [f"answer to {item}" for item in items]


def test_requests_queued_while_busy_form_the_next_batches_in_order():
    async def scenario():
        model = GatedModel()
        batcher = BusyBatcher(model, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(0))
        await model.started.wait()  # a lone request on an idle model starts alone, at once
        assert model.batches == [[0]]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 12)]
        await asyncio.sleep(0.01)
        assert model.batches == [[0]], "nothing runs beside a busy model"
        model.gate.set()
        answers = await asyncio.gather(first, *rest)
        return model.batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [[0], list(range(1, 9)), [9, 10, 11]]
    assert answers == [f"answer to {i}" for i in range(12)]


def test_a_failed_batch_fails_its_callers_only():
    async def scenario():
        model = GatedModel()
        batcher = BusyBatcher(model, max_batch_size=2)
        blocked = asyncio.create_task(batcher.submit("a"))
        await model.started.wait()
        failing = [asyncio.create_task(batcher.submit(item)) for item in ("boom", "b")]
        later = asyncio.create_task(batcher.submit("c"))
        model.gate.set()
        return await asyncio.gather(blocked, *failing, later, return_exceptions=True)

    first, boom, b, later = asyncio.run(scenario())
    assert first == "answer to a" and later == "answer to c"
    assert isinstance(boom, RuntimeError) and boom is b, "both callers of the failed batch get its error"


def test_a_cancelled_request_is_left_out_of_its_batch():
    async def scenario():
        model = GatedModel()
        batcher = BusyBatcher(model, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(1))
        await model.started.wait()
        gone, kept = asyncio.create_task(batcher.submit(2)), asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while waiting
        model.gate.set()
        await asyncio.gather(first, kept)
        return model.batches

    assert asyncio.run(scenario()) == [[1], [3]]


def test_batcher_refuses_settings_it_cannot_honour():
    with pytest.raises(ValueError, match="max_batch_size"):
        BusyBatcher(GatedModel(), max_batch_size=0)
    with pytest.raises(ValueError, match="batch wait"):
        BusyBatcher(GatedModel(), max_batch_size=4, max_wait_s=-1)


def test_group_commit_writes_what_waited_in_one_transaction_and_fails_only_its_callers():
    writes: list[list] = []
    release = threading.Event()

    def write(rows: list) -> None:  # blocking, like the INSERT it stands for
        writes.append(rows)
        if len(writes) == 1:
            release.wait(5)
        if "bad" in rows:
            raise RuntimeError("the database refused the rows")

    async def scenario():
        log = GroupCommit(write)
        first = asyncio.create_task(log.commit(["r1"]))
        while not writes:  # the first commit is in flight
            await asyncio.sleep(0.001)
        waiting = [asyncio.create_task(log.commit(rows)) for rows in (["r2", "r3"], ["r4"])]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, *waiting)
        failed = await asyncio.gather(log.commit(["bad"]), return_exceptions=True)
        await log.commit(["r5"])  # the next commit after a failure works
        return failed

    failed = asyncio.run(scenario())
    assert writes == [["r1"], ["r2", "r3", "r4"], ["bad"], ["r5"]]
    assert isinstance(failed[0], RuntimeError)
