"""The worker state machine: every edge of the transition table, legal and illegal."""

from __future__ import annotations

import itertools

import pytest

from warmexec.supervisor import lifecycle
from warmexec.supervisor.lifecycle import TRANSITIONS, IllegalTransition, Lifecycle, State


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def at(state: State) -> tuple[Lifecycle, list[tuple[str, dict]], Clock]:
    """A lifecycle in state, reached by legal edges, with its events recorded from there."""
    path = {State.STARTING: [], State.JOINING: [State.JOINING], State.READY: [State.JOINING, State.READY],
            State.BACKOFF: [State.BACKOFF], State.FATAL: [State.BACKOFF, State.FATAL],
            State.EXITED: [State.EXITED]}[state]
    events: list[tuple[str, dict]] = []
    clock = Clock()
    life = Lifecycle("c1", lambda topic, **f: events.append((topic, f)), clock)
    for step in path:
        life.transition(step)
    events.clear()
    return life, events, clock


@pytest.mark.parametrize("old,new", list(itertools.product(State, State)))
def test_every_edge(old: State, new: State) -> None:
    life, events, clock = at(old)
    clock.now += 1
    if new in TRANSITIONS[old]:
        life.transition(new, "why")
        assert life.state == new and life.since == clock.now
        assert events == [("worker.state", {"container": "c1", "old": old.name, "new": new.name,
                                            "reason": "why"})]
    else:
        with pytest.raises(IllegalTransition):
            life.transition(new)
        assert life.state == old and not events


def test_every_state_is_reachable_and_only_exited_is_final() -> None:
    reached, todo = {State.STARTING}, [State.STARTING]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert reached == set(State)
    assert [s for s in State if not TRANSITIONS[s]] == [State.EXITED]


def test_backoff_doubles_up_to_its_cap_and_gives_up_after_max_failures() -> None:
    life, _, clock = at(State.STARTING)
    delays = []
    for i in range(lifecycle.MAX_FAILURES + 3):
        life.transition(State.BACKOFF, f"death {i}")
        delays.append(round(life.retry_at - clock.now, 6))
        assert life.last_error == f"death {i}"
        life.transition(State.STARTING)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and max(delays) == lifecycle.BACKOFF_MAX
    assert life.out_of_retries()


def test_a_worker_that_served_a_while_starts_a_new_run_of_failures() -> None:
    life, _, clock = at(State.STARTING)
    for _ in range(3):  # dies at once after READY each time: one run
        life.transition(State.JOINING)
        life.transition(State.READY)
        life.transition(State.BACKOFF)
        life.transition(State.STARTING)
    assert life.failures == 3
    life.transition(State.JOINING)
    life.transition(State.READY)
    clock.now += lifecycle.STABLE_AFTER
    life.transition(State.BACKOFF)
    assert life.failures == 1 and not life.out_of_retries()


def test_labels_name_the_profile_in_each_event() -> None:
    events = []
    life = Lifecycle("c1", lambda topic, **f: events.append(f), user="nobody", privileged=False)
    life.transition(State.JOINING)
    assert events[0]["user"] == "nobody" and events[0]["privileged"] is False
