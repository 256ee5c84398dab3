"""FunctionPool: the instances of one function revision (on-demand and provisioned, by state),
and PoolStatistics, the figures the pool reports."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from hxb.models import FunctionRevision
from hxb.pool.worker import Worker, WorkerState


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    instances: int
    idle: int
    busy: int
    starting: int
    waiting: int
    cold_starts: int
    warm_starts: int
    timeouts: int
    # Provisioned instances ready (idle or busy; also counted in `idle` and `busy`), and how
    # many more were asked for but did not fit the node (instance cap or memory budget).
    provisioned: int = 0
    provisioned_shortfall: int = 0


class FunctionPool:
    """The instances of one function revision. A Worker is in at most one of `idle`,
    `provisioned_idle` and `busy`; `provisioned` marks the provisioned ones among `busy` and
    `provisioned_idle`."""

    def __init__(self, revision: FunctionRevision) -> None:
        self.revision = revision
        self.idle: list[Worker] = []  # on demand; LIFO: the most recently used is the warmest
        self.busy: set[Worker] = set()  # on demand and provisioned, serving one invocation or more
        self.starting = 0  # on demand
        self.waiters: deque[asyncio.Future[Worker]] = deque()
        self.retired = False
        # Every instance of this revision whose process has not exited yet, stopping ones too:
        # the revision's code must stay on disk until this is empty.
        self.members: set[Worker] = set()
        # Starts decided whose Worker does not exist yet: they hold memory already.
        self.launching = 0
        self.drained = asyncio.Event()
        # Provisioned concurrency.
        self.provisioned_target = 0
        self.provisioned: set[Worker] = set()  # ready: idle or busy
        self.provisioned_idle: list[Worker] = []
        self.provisioned_starting = 0
        self.provisioned_shortfall = 0
        self.provision_failures = 0  # failed starts in a row: the backoff's exponent
        self.provision_retry: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    def with_free_slot(self) -> Worker | None:
        """A busy instance that can take one more invocation (concurrency_per_instance > 1),
        a provisioned one first; None if there is none."""
        found: Worker | None = None
        for worker in self.busy:
            if worker.running < worker.capacity and not worker.draining and worker.state is WorkerState.BUSY:
                if worker in self.provisioned:
                    return worker
                found = found or worker
        return found

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.provisioned_idle) + len(self.busy) + self.starting + self.provisioned_starting

    @property
    def memory_holders(self) -> int:
        """Instances holding this revision's memory: decided, starting, running or stopping."""
        return self.launching + len(self.members)

    @property
    def provisioned_missing(self) -> int:
        """Provisioned instances to start (negative: how many are too many)."""
        return self.provisioned_target - len(self.provisioned) - self.provisioned_starting

    def notify(self) -> None:
        """Wakes `wait_changed` callers: the provisioned instances changed."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()


def sum_statistics(pools: Iterable[FunctionPool]) -> PoolStatistics:
    """The instance figures of `pools` added up; the start and timeout counters are 0."""
    pools = list(pools)
    return PoolStatistics(
        instances=sum(p.size for p in pools),
        idle=sum(len(p.idle) + len(p.provisioned_idle) for p in pools),
        busy=sum(len(p.busy) for p in pools),
        starting=sum(p.starting + p.provisioned_starting for p in pools),
        waiting=sum(len(p.waiters) for p in pools),
        cold_starts=0,
        warm_starts=0,
        timeouts=0,
        provisioned=sum(len(p.provisioned) for p in pools),
        provisioned_shortfall=sum(p.provisioned_shortfall for p in pools),
    )
