"""The call's schedule (handler/scheduler.py) on its own: plain numbers in, plain decisions out, on a clock the
test moves. No TorchServe, no engine."""

import subprocess
import sys

import pytest

from conftest import ROOT
from scheduler import CLIENT_GONE_FIRST, EXPIRED, TOO_LITTLE_TIME, CallSchedule, ClientWait, Group, Turn, batches

STARTED = 1000.0  # the call's start on the schedule's clock (time.perf_counter() in the handler)


def schedule_of(*groups: Group, seconds: float = 100, time_cap: float = 1e9, margin: float = 0) -> CallSchedule:
    schedule = CallSchedule(STARTED, seconds, time_cap, margin)
    schedule.plan(groups)
    return schedule


def test_groups_run_cheapest_first_each_with_its_reserved_time_and_its_share_of_what_is_left():
    cheap = Group((1,), fixed=10, reserved=12, past_deadline=4, iterations=20)
    dear = Group((0,), fixed=10, reserved=12, past_deadline=4, iterations=60)
    schedule = schedule_of(dear, cheap)  # in arrival order: the dearer first
    first = schedule.next_turn(STARTED)
    # 100 s less both groups' reserved time leaves 76 s, shared 20 : 60; its iterations end what may run after
    # their deadline before the group's end
    assert first == Turn((), (1,), deadline=STARTED + 12 + 19 - 4)
    # the first group ended 5 s early: the second gets all that is left
    second = schedule.next_turn(STARTED + 25)
    assert second == Turn((), (0,), deadline=STARTED + 100 - 4)
    assert schedule.next_turn(STARTED + 90) is None


def test_groups_whose_reserved_time_does_not_fit_are_refused_the_most_expensive_first():
    small, middle, large = (Group((i,), fixed=reserved - 5, reserved=reserved, past_deadline=5, iterations=1)
                            for i, reserved in enumerate((20, 30, 60)))
    schedule = schedule_of(large, small, middle)
    turn = schedule.next_turn(STARTED)
    assert turn.refused == ((2, TOO_LITTLE_TIME),) and turn.requests == (0,)  # 20 + 30 fit in 100 s, not + 60
    # the first group overran: what is left no longer holds the second's reserved time
    assert schedule.next_turn(STARTED + 75) == Turn(((1, TOO_LITTLE_TIME),), (), STARTED + 75)
    assert schedule.next_turn(STARTED + 75) is None


def test_no_group_runs_past_the_time_cap():
    group = Group((0, 1), fixed=5, reserved=7, past_deadline=3, iterations=50)
    (turn,) = [schedule_of(group, seconds=100, time_cap=30).next_turn(STARTED)]
    assert turn.deadline == STARTED + 30 - 3


def test_a_request_whose_client_leaves_before_its_fixed_work_ends_is_refused_and_the_rest_end_in_time():
    schedule = CallSchedule(STARTED, 100, 1e9, reply_margin=2)
    now_epoch = 1_700_000_000.0
    waits = {0: ClientWait(now_epoch - 1, 60), 1: ClientWait(now_epoch - 50, 55), 2: None}  # 59 s, 5 s, unknown
    assert all(schedule.expect_client(i, wait, now_epoch) for i, wait in waits.items())
    schedule.plan([Group((0, 1, 2), fixed=10, reserved=14, past_deadline=6, iterations=100)])
    turn = schedule.next_turn(STARTED)
    assert turn.refused == ((1, CLIENT_GONE_FIRST),)  # 5 s less the 2 s margin: less than 10 s of fixed work
    assert turn.requests == (0, 2) and turn.deadline == pytest.approx(STARTED + 59 - 2 - 6)


def test_a_request_that_outwaited_its_client_is_refused_before_any_planning():
    schedule = CallSchedule(STARTED, 100, 1e9, reply_margin=30)
    assert not schedule.expect_client(3, ClientWait(arrived=100.0, timeout=10), now_epoch=110.5)
    assert schedule.client_ends == {}
    assert schedule.record({3: "r3"})["refused"] == [{"request_id": "r3", "reason": EXPIRED}]


def test_the_record_is_the_call_s_decisions_in_order_with_times_from_the_start_of_the_call():
    schedule = schedule_of(Group((0,), fixed=1.23456, reserved=2.5, past_deadline=1, iterations=2),
                           Group((1,), fixed=200, reserved=201, past_deadline=1, iterations=1))
    schedule.next_turn(STARTED + 0.5)
    schedule.next_turn(STARTED + 2)
    assert schedule.record({0: "a", 1: "b"}) == {
        "seconds": 100,
        "groups": [{"requests": ["a"], "fixed": 1.235, "reserved": 2.5, "iterations": 2, "start": 0.5,
                    "deadline": 99}],
        "refused": [{"request_id": "b", "reason": TOO_LITTLE_TIME}]}


def test_batches_keep_arrival_order_and_split_where_memory_would_not_hold_one_more():
    keys = {0: "a", 1: "b", 2: "a", 3: "a", 4: "b", 5: "a"}
    assert batches(keys, lambda requests: True) == [[0, 2, 3, 5], [1, 4]]
    assert batches(keys, lambda requests: len(requests) <= 2) == [[0, 2], [3, 5], [1, 4]]
    assert batches({}, lambda requests: True) == []


def test_the_schedule_needs_neither_torchserve_nor_torch():
    check = "import sys, scheduler; print(sorted({'torch', 'ts'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", check], cwd=ROOT / "handler", capture_output=True, text=True,
                            timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
