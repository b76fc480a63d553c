"""`leader.LeaderElector`: client-go's Lease rules, on a fake Lease API and a fake clock.

Time here is simulated (`FakeTime`): every elector sleeps on it, and the test moves it
from one wake-up to the next, so the bounds of the rules (never take a Lease before it
expired, a leader that cannot renew stops before anyone may take over) are checked
exactly, without real waits.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bmad_operator import leader

pytestmark = pytest.mark.unit

NS, NAME = "bmad-system", "bmad-operator"
T = leader.Timings()  # 15 / 10 / 2, client-go's defaults
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LONGEST_RETRY = T.retry_period * (1 + leader.JITTER)


class FakeTime:
    """A clock that moves only when the test says so, waking sleepers in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def wall(self) -> dt.datetime:
        return EPOCH + dt.timedelta(seconds=self.now)

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), future))
        await future

    @staticmethod
    async def settle() -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def run_until(self, when: float, stop: Callable[[], bool] = lambda: False) -> float:
        """Move time to `when`, or to the first moment `stop()` holds; return that moment."""
        await self.settle()
        while not stop() and self._sleepers and self._sleepers[0][0] <= when:
            at, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, at)
            if not future.done():
                future.set_result(None)
            await self.settle()
        if not stop():
            self.now = max(self.now, when)
        return self.now


class FakeLeases:
    """One API server's Leases: resourceVersions, 409 on a stale one, and outages."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = itertools.count(1)
        self.down = False
        self.writes: list[dict[str, Any]] = []

    def _check(self) -> None:
        if self.down:
            raise leader.LeaseError("the API server was not reached: connection refused")

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check()
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found else None

    async def create(self, lease: dict[str, Any]) -> dict[str, Any]:
        self._check()
        key = (lease["metadata"]["namespace"], lease["metadata"]["name"])
        if key in self.objects:
            raise leader.Conflict("leases already exists")
        return self._store(key, lease)

    async def replace(self, lease: dict[str, Any]) -> dict[str, Any]:
        self._check()
        key = (lease["metadata"]["namespace"], lease["metadata"]["name"])
        current = self.objects.get(key)
        if current is None or (
            current["metadata"]["resourceVersion"] != lease["metadata"].get("resourceVersion")
        ):
            raise leader.Conflict("the object has been modified")
        return self._store(key, lease)

    def _store(self, key: tuple[str, str], lease: dict[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(next(self.version))
        self.objects[key] = stored
        self.writes.append(copy.deepcopy(stored))
        return copy.deepcopy(stored)

    def spec(self) -> dict[str, Any]:
        return dict(self.objects[(NS, NAME)]["spec"])


class Candidate:
    """One replica: an elector, its task, and when it started and stopped leading."""

    def __init__(self, leases: FakeLeases, time: FakeTime, identity: str) -> None:
        self.log: list[tuple[str, float]] = []
        self.elector = leader.LeaderElector(
            leases,
            namespace=NS,
            name=NAME,
            identity=identity,
            timings=T,
            on_started=lambda: self.log.append(("started", time.now)),
            on_stopped=self._stopped,
            clock=time.clock,
            wall=time.wall,
            sleep=time.sleep,
        )
        self.time = time
        self.task: asyncio.Task[None] | None = None

    async def _stopped(self) -> None:  # an async callback works as well as a plain one
        self.log.append(("stopped", self.time.now))

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run())

    async def crash(self) -> None:
        """Cancelled without releasing: what SIGKILL looks like to the others."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    @property
    def leads(self) -> bool:
        return self.elector.is_leader

    def when(self, what: str) -> list[float]:
        return [t for w, t in self.log if w == what]


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def leases() -> FakeLeases:
    return FakeLeases()


@pytest.fixture
async def candidates(
    leases: FakeLeases, time: FakeTime
) -> AsyncIterator[Callable[[str], Candidate]]:
    made: list[Candidate] = []

    def make(identity: str) -> Candidate:
        c = Candidate(leases, time, identity)
        made.append(c)
        return c

    yield make
    for c in made:
        if c.task is not None and not c.task.done():
            await c.crash()


def assert_never_two_leaders(*cs: Candidate) -> None:
    """From the start/stop logs: no moment where two candidates both led."""
    spans = []
    for c in cs:
        starts, stops = c.when("started"), c.when("stopped")
        for i, s in enumerate(starts):
            spans.append((s, stops[i] if i < len(stops) else float("inf"), c.elector.identity))
    spans.sort()
    for (_, end, who), (start, _, other) in itertools.pairwise(spans):
        assert start >= end, f"{who} and {other} both led at {start:.2f}s"


async def test_the_first_candidate_creates_the_lease(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a = candidates("a")
    a.start()
    await time.run_until(0.0)

    assert a.leads
    assert a.when("started") == [0.0]
    spec = leases.spec()
    assert spec["holderIdentity"] == "a"
    assert spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    assert spec["acquireTime"] == spec["renewTime"] == "2026-01-01T00:00:00.000000Z"


async def test_the_leader_renews_every_retry_period_and_keeps_its_acquire_time(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a = candidates("a")
    a.start()
    await time.run_until(60.0)

    assert a.leads
    spec = leases.spec()
    assert spec["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert spec["renewTime"] == "2026-01-01T00:01:00.000000Z"
    assert spec["leaseTransitions"] == 0
    renewals = [w["spec"]["renewTime"] for w in leases.writes]
    assert len(renewals) == 31  # the create, then one renewal every 2 s for 60 s


async def test_of_two_candidates_exactly_one_leads_and_the_other_waits(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("a"), candidates("b")
    a.start()
    b.start()
    await time.run_until(120.0)

    assert [a.leads, b.leads].count(True) == 1
    winner = "a" if a.leads else "b"
    assert leases.spec()["holderIdentity"] == winner
    assert leases.spec()["leaseTransitions"] == 0
    assert_never_two_leaders(a, b)


async def test_a_stale_resource_version_loses_the_race(leases: FakeLeases, time: FakeTime) -> None:
    """Both saw the same expired Lease; the API server accepts the first write only."""
    leases.objects[(NS, NAME)] = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": "7"},
        "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 15, "leaseTransitions": 3},
    }
    read = asyncio.Event()
    reads = 0
    real_get = leases.get

    async def get_then_wait(namespace: str, name: str) -> dict[str, Any] | None:
        nonlocal reads
        found = await real_get(namespace, name)
        reads += 1
        if reads == 2:
            read.set()
        await read.wait()  # both have read version 7 before either writes
        return found

    leases.get = get_then_wait  # type: ignore[method-assign]
    electors = [
        leader.LeaderElector(
            leases, namespace=NS, name=NAME, identity=i, timings=T, clock=lambda: 100.0
        )
        for i in ("a", "b")
    ]
    for e in electors:  # both first saw the record long ago: it has expired for both
        e._observed_at = -100.0
        e._observed = ("gone", 15, None, None, 3)
    won = await asyncio.gather(*(e._try_acquire_or_renew(renewing=False) for e in electors))

    assert sorted(won) == [False, True]
    assert leases.spec()["holderIdentity"] == ("a" if won[0] else "b")
    assert leases.spec()["leaseTransitions"] == 4


async def test_a_standby_takes_a_crashed_leaders_lease_once_it_expired(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("a"), candidates("b")
    a.start()
    await time.run_until(0.0)
    b.start()
    await time.run_until(30.0)
    last_renewal = max(float(i) for i in range(0, 31, 2))  # a renews every 2 s
    await a.crash()
    crashed_at = time.now

    took = await time.run_until(120.0, stop=lambda: b.leads)

    assert b.leads
    assert a.when("stopped") == [crashed_at]  # cancelling stops leading, at once
    assert leases.spec()["holderIdentity"] == "b"
    assert leases.spec()["leaseTransitions"] == 1
    # Never before the Lease expired on b's clock (it saw a's last renewal at most one
    # retry later), and right when it did: within lease duration + one retry period.
    assert took >= last_renewal + T.lease_duration
    assert took - crashed_at <= T.lease_duration + LONGEST_RETRY
    assert_never_two_leaders(a, b)


async def test_graceful_release_hands_over_at_the_standbys_next_retry(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("a"), candidates("b")
    a.start()
    await time.run_until(0.0)
    b.start()
    await time.run_until(20.0)

    released = await a.elector.release()
    released_at = time.now
    assert released
    assert not a.leads
    assert a.when("stopped") == [released_at]
    spec = leases.spec()
    assert spec["holderIdentity"] is None
    assert spec["leaseDurationSeconds"] == 1
    assert spec["leaseTransitions"] == 0

    took = await time.run_until(120.0, stop=lambda: b.leads)
    assert b.leads
    assert took - released_at <= LONGEST_RETRY  # not a lease duration
    assert leases.spec()["holderIdentity"] == "b"
    assert leases.spec()["leaseTransitions"] == 1


async def test_a_leader_that_cannot_renew_stops_before_anyone_may_take_over(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a = candidates("a")
    a.start()
    await time.run_until(10.0)
    last_renewal = 10.0
    leases.down = True  # the API server is out of reach from now on

    stopped = await time.run_until(60.0, stop=lambda: not a.leads)

    assert not a.leads
    assert a.when("stopped") == [stopped]
    assert stopped <= last_renewal + T.retry_period + T.renew_deadline
    assert stopped < last_renewal + T.lease_duration  # before the Lease may be taken

    # It campaigns again, and leads again once the API server is back.
    leases.down = False
    await time.run_until(200.0, stop=lambda: a.leads)
    assert a.leads
    assert a.when("started") == [0.0, time.now]


async def test_a_leader_that_finds_another_holder_stops_at_once(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a = candidates("a")
    a.start()
    await time.run_until(4.0)
    stored = leases.objects[(NS, NAME)]
    stored["spec"]["holderIdentity"] = "intruder"
    stored["metadata"]["resourceVersion"] = str(next(leases.version))

    stopped = await time.run_until(60.0, stop=lambda: not a.leads)

    assert stopped <= 4.0 + T.retry_period
    assert leases.spec()["holderIdentity"] == "intruder"  # not taken back while valid


async def test_releasing_a_lease_one_does_not_hold_writes_nothing(
    leases: FakeLeases, time: FakeTime, candidates: Callable[[str], Candidate]
) -> None:
    a, b = candidates("a"), candidates("b")
    a.start()
    await time.run_until(0.0)
    b.start()
    await time.run_until(5.0)
    writes = len(leases.writes)

    assert not await b.elector.release()
    assert len(leases.writes) == writes
    assert leases.spec()["holderIdentity"] == "a"


@pytest.mark.parametrize(
    ("lease", "renew", "retry", "says"),
    [
        (15, 15, 2, "lease duration (15s) must be longer than the renew deadline (15s)"),
        (15, 2, 2, "renew deadline (2s) must be longer than 1.2 x the retry period (2s)"),
        (15, 10, 0, "retry period must be positive"),
    ],
)
def test_timings_that_break_the_rules_are_refused(
    lease: float, renew: float, retry: float, says: str
) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        leader.Timings(lease_duration=lease, renew_deadline=renew, retry_period=retry)


def test_micro_time_is_rfc3339_with_microseconds_in_utc() -> None:
    moment = dt.datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert leader.micro_time(moment) == "2026-03-04T03:06:07.000089Z"
