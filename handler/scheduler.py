"""The time plan of one call of the handler: which requests are optimised together, in which order, with how
much of the call's time each, and which are answered 503 instead, and why. Plain data in and out (request
indices, seconds on one clock): no TorchServe, no tensors.

TorchServe waits responseTimeout for all the answers of a call together, so the call has one deadline. Groups
run the cheapest first. Before each group, the groups whose reserved time (what a group takes however short its
time: its fixed work, the work no deadline interrupts, and an iteration that may run past its deadline:
style_engine/cost.py) no longer fits the time left are refused, the most expensive first; the group then gets
its reserved time plus its share of the time the others' reserved time leaves, by its iterations' cost, and at
most the server's time cap. Its iterations end early enough for what may still run after their deadline. What a
group leaves unused goes to the next. A request whose client stops waiting (ClientWait) before its group's
fixed work can end is refused rather than computed for nobody, and its group ends when the first of its
remaining clients stops waiting.
"""

import math
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

TOO_LITTLE_TIME = "the requests of this call before it leave too little time"
CLIENT_GONE_FIRST = "its client's timeout (the proxy's X-Request-Timeout-Ms) leaves too little time for its work"
EXPIRED = "expired"  # the reason recorded for a request that outwaited its client before the call began


@dataclass(frozen=True)
class Group:
    """Requests (indices in the call) that are optimised together as one batch, and what that costs."""
    requests: tuple[int, ...]
    fixed: float  # seconds of work no deadline interrupts, before and after the iterations
    reserved: float  # seconds it takes however short its time: its fixed work and an iteration past the deadline
    past_deadline: float  # seconds that may still run once its iterations' deadline has passed
    iterations: float  # seconds of all the iterations the requests ask for


@dataclass(frozen=True)
class Turn:
    """What the call does next: answer each of `refused` (request, reason) 503, then optimise `requests`
    (possibly none) with iterations that end by `deadline`."""
    refused: tuple[tuple[int, str], ...]
    requests: tuple[int, ...]
    deadline: float


def batches(keys: Mapping[int, Hashable], fit: Callable[[list[int]], bool]) -> list[list[int]]:
    """Request indices grouped so that each group can be optimised as one batch: the same key (settings and
    output size), and together within the memory budget as they are (`fit(requests)`), in arrival order."""
    by_key: dict[Hashable, list[int]] = {}
    for index, key in keys.items():
        by_key.setdefault(key, []).append(index)
    groups = []
    for indices in by_key.values():
        group = [indices[0]]
        for index in indices[1:]:
            if fit([*group, index]):
                group.append(index)
            else:
                groups.append(group)
                group = [index]
        groups.append(group)
    return groups


class CallSchedule:
    """The plan of one call that began at `started` and must end by `started + seconds`; no request may take
    longer than `time_cap`. `reply_margin`: what a client's wait keeps back for the answer's way back."""

    def __init__(self, started: float, seconds: float, time_cap: float, reply_margin: float):
        self.started, self.deadline = started, started + seconds
        self.time_cap, self.reply_margin = time_cap, reply_margin
        self.client_ends: dict[int, float] = {}  # by request: when its answer must be ready for its client
        self.waiting: list[Group] = []
        self.decisions: list[dict] = []  # what the log line of the call says (record)

    def expect_client(self, request: int, wait: "ClientWait | None", now_epoch: float) -> bool:
        """Note how long the client of `request` waits (None: not told); False when it has stopped already."""
        if wait is None:
            return True
        left = wait.left(now_epoch)
        if left <= 0:
            self.decisions.append({"refused": request, "reason": EXPIRED})
            return False
        self.client_ends[request] = self.started + left - self.reply_margin
        return True

    def plan(self, groups: Sequence[Group]) -> None:
        self.waiting = sorted(groups, key=lambda group: group.fixed + group.iterations)

    def next_turn(self, now: float) -> Turn | None:
        """The next step at time `now`; None once every group has had its turn."""
        if not self.waiting:
            return None
        refused = []
        while self.waiting and sum(group.reserved for group in self.waiting) > self.deadline - now:
            refused += [(request, TOO_LITTLE_TIME) for request in self.waiting.pop().requests]
        if not self.waiting:
            return self._decided(Turn(tuple(refused), (), now), now, None)
        reserved, iterations = (sum(getattr(g, cost) for g in self.waiting) for cost in ("reserved", "iterations"))
        group = self.waiting.pop(0)
        share = (self.deadline - now - reserved) * group.iterations / max(iterations, 1e-9)
        end = min(now + group.reserved + share, now + self.time_cap)
        kept = []
        for request in group.requests:
            if self.client_ends.get(request, math.inf) < now + group.fixed:
                refused.append((request, CLIENT_GONE_FIRST))
            else:
                kept.append(request)
        end = min([end, *(self.client_ends[request] for request in kept if request in self.client_ends)])
        return self._decided(Turn(tuple(refused), tuple(kept), end - group.past_deadline), now, group)

    def _decided(self, turn: Turn, now: float, group: Group | None) -> Turn:
        self.decisions += [{"refused": request, "reason": reason} for request, reason in turn.refused]
        if turn.requests:
            self.decisions.append({"requests": list(turn.requests), "fixed": group.fixed,
                                   "reserved": group.reserved, "iterations": group.iterations,
                                   "start": now - self.started, "deadline": turn.deadline - self.started})
        return turn

    def record(self, request_ids: Mapping[int, str]) -> dict:
        """The call's decisions as JSON-ready data: its time, the groups in the order they ran (their requests,
        costs, start and iterations' deadline, seconds from the call's start) and the requests refused, why."""
        groups = [{"requests": [request_ids[i] for i in d["requests"]],
                   **{key: round(d[key], 3) for key in ("fixed", "reserved", "iterations", "start", "deadline")}}
                  for d in self.decisions if "requests" in d]
        refused = [{"request_id": request_ids[d["refused"]], "reason": d["reason"]}
                   for d in self.decisions if "refused" in d]
        return {"seconds": round(self.deadline - self.started, 3), "groups": groups, "refused": refused}


# Set by the proxy nearest TorchServe (deploy/nginx.conf's hops, deploy/k8s/auth-proxy.yaml), replacing whatever
# a client sent: when the request reached it, "t=<seconds since the epoch>" ($msec: the Heroku and New Relic
# convention, which also allows milliseconds and microseconds), and how long it waits for the answer, in
# milliseconds (its proxy_read_timeout; Envoy's x-envoy-expected-rq-timeout-ms says the same).
REQUEST_START_HEADER = "x-request-start"
REQUEST_TIMEOUT_HEADER = "x-request-timeout-ms"
_NUMBER = re.compile(r"[0-9]{1,20}(\.[0-9]{1,9})?")
_EPOCH_UNITS = ((1e15, 1e-6), (1e12, 1e-3), (0, 1.0))  # from the value's magnitude: microseconds, ms, seconds


@dataclass(frozen=True)
class ClientWait:
    """How long the client of a request waits for its answer, as the proxy nearest TorchServe declares it. The
    proxy runs on the worker's host (the local cluster's hops) or in its pod (the auth proxy): one clock."""
    arrived: float  # when the request reached the proxy, seconds since the epoch
    timeout: float  # how long the proxy waits for the answer, seconds

    @classmethod
    def from_headers(cls, headers: Mapping) -> "ClientWait | None":
        """From a request's headers (any case); None when either header is missing or malformed: such a request
        (a direct client on loopback, the management API's describe call) is not checked."""
        values = {name.lower(): value for name, value in headers.items() if isinstance(name, str)}
        arrived = _epoch_seconds(values.get(REQUEST_START_HEADER))
        timeout_ms = _number(values.get(REQUEST_TIMEOUT_HEADER))
        if arrived is None or not timeout_ms:
            return None
        return cls(arrived, timeout_ms / 1000)

    def waited(self, now: float) -> float:
        return now - self.arrived

    def left(self, now: float) -> float:
        """Seconds until the proxy gives up on the answer (`now` in seconds since the epoch); negative: gone."""
        return self.arrived + self.timeout - now


def _number(value) -> float | None:
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else None


def _epoch_seconds(value) -> float | None:
    if not isinstance(value, str):
        return None
    number = _number(value.strip().removeprefix("t="))
    if not number:
        return None
    return next(number * scale for at_least, scale in _EPOCH_UNITS if number >= at_least)


def expired_message(wait: ClientWait, now: float) -> str:
    """Why a request that outwaited its client is dropped (503 Expired)."""
    return (f"this request waited {wait.waited(now):.1f} s for a worker, longer than its client waits "
            f"({wait.timeout:g} s, the proxy's X-Request-Timeout-Ms): it was dropped before any work; send it again "
            f"when the server is less busy (Retry-After)")
