"""The front end's request group hands every output to its waiter, the final one included, whatever
the order in which outputs arrive and the consumer reads them."""

from __future__ import annotations

import asyncio
import threading

from plait.runtime.frontend.messages import GenerateRequest, RequestOutput
from plait.runtime.frontend.tracker import RequestGroup, RequestState, RequestTracker
from plait.sampling_params import SamplingParams


def _group(n: int = 1) -> tuple[RequestTracker, RequestGroup]:
    states = [RequestState(GenerateRequest(rid=f"r{i}", input_ids=[1, 2], sampling_params=SamplingParams()), None)
              for i in range(n)]
    tracker = RequestTracker()
    group = RequestGroup(states)
    tracker.add(group)
    return tracker, group


def _out(rid: str, text: str, token: int, finished: bool) -> RequestOutput:
    return RequestOutput(rid=rid, new_text=text, new_output_ids=[token], finished=finished,
                         finish_reason={"type": "length", "length": 2} if finished else None)


def test_a_final_output_applied_while_the_thread_consumer_works_is_still_handed_out():
    tracker, group = _group()
    state = group.states[0]
    tracker.on_output(_out("r0", " Rajas", 7, finished=False))
    snapshots = []
    for _ in group.sync_updates():
        snapshots.append(state.result()["text"])
        if len(snapshots) == 1:
            # the last output lands after the consumer took its snapshot, before the waiter resumes
            tracker.on_output(_out("r0", " arrived", 8, finished=True))
    assert snapshots == [" Rajas", " Rajas arrived"]


def test_a_final_output_applied_while_the_async_consumer_works_is_still_handed_out():
    async def run() -> list[str]:
        tracker, group = _group()
        state = group.states[0]
        tracker.on_output(_out("r0", " Rajas", 7, finished=False))
        snapshots = []
        async for _ in group.updates():
            snapshots.append(state.result()["text"])
            if len(snapshots) == 1:
                asyncio.get_running_loop().call_soon(tracker.on_output, _out("r0", " arrived", 8, True))
                await asyncio.sleep(0)  # the consumer awaits (sends its chunk); the output lands meanwhile
        return snapshots

    assert asyncio.run(run()) == [" Rajas", " Rajas arrived"]


def test_a_state_finished_but_not_yet_notified_keeps_the_waiter_waiting():
    # the transport applies an output, then notifies: a waiter woken in between must not stop there
    _, group = _group()
    group.states[0].add(_out("r0", "a", 5, finished=True))
    group._thread_event.set()  # a wake-up left by an earlier output
    taken: list[list[int]] = []
    waiter = threading.Thread(target=lambda: taken.extend(group.sync_updates()))
    waiter.start()
    waiter.join(0.2)  # the waiter wakes, takes nothing yet
    group.notify(0)
    waiter.join(5)
    assert not waiter.is_alive()
    assert taken == [[0]]


def test_every_copy_of_a_group_is_handed_out_to_its_end():
    tracker, group = _group(3)
    seen: dict[int, str] = {}
    pending = [("r0", True), ("r1", False), ("r2", False), ("r1", True), ("r2", True)]
    tracker.on_output(_out("r0", "x", 1, finished=False))
    for changed in group.sync_updates():
        for i in changed:
            seen[i] = group.states[i].result()["text"]
        if pending:
            rid, finished = pending.pop(0)
            tracker.on_output(_out(rid, "y" if finished else "x", 2, finished))
    assert not pending
    assert seen == {0: "xy", 1: "xy", 2: "xy"}
