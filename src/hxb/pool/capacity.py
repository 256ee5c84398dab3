"""Room on the node: the instance cap (`max_instances`) and the memory budget
(`memory_budget_mb`), and which idle instances to evict to stay under both."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hxb.config import PoolSettings
from hxb.errors import ThrottledError
from hxb.pool.function_pool import FunctionPool
from hxb.pool.worker import Worker, WorkerState


def memory_used_mb(pools: Iterable[FunctionPool]) -> int:
    """Memory held by every instance, from the decision to start it until its process exited."""
    return sum(p.revision.config.memory * p.memory_holders for p in pools)


def memory_stopping_mb(pools: Iterable[FunctionPool]) -> int:
    """The part of `memory_used_mb` held by instances that are stopping (or being killed)."""
    # A stopping instance is DEAD at once (`Worker.stop`) and a member until it exited.
    return sum(p.revision.config.memory * sum(1 for w in p.members if w.state is WorkerState.DEAD) for p in pools)


def victims_for(pools: Sequence[FunctionPool], pool: FunctionPool, settings: PoolSettings) -> list[Worker]:
    """The idle instances to evict so that one more instance of `pool` fits the node: the
    least recently used on-demand ones of other functions, as few as will do. Provisioned
    instances are never evicted.

    Stopping instances count as freed: they exit within the grace period, and a start that
    counts on their memory waits for it before it spawns.

    Raises:
        ThrottledError: even evicting every candidate would not make room.
    """
    need_mb = pool.revision.config.memory
    over_cap = sum(p.size for p in pools) + 1 - settings.max_instances
    used_mb = memory_used_mb(pools)
    over_mb = used_mb - memory_stopping_mb(pools) + need_mb - settings.memory_budget_mb
    candidates = iter(sorted((w for p in pools if p is not pool for w in p.idle), key=lambda w: w.last_used))
    victims: list[Worker] = []
    while len(victims) < over_cap or over_mb > 0:
        victim = next(candidates, None)
        if victim is None:
            raise _throttled(pool, settings, cap=len(victims) < over_cap, used_mb=used_mb)
        victims.append(victim)
        over_mb -= victim.revision.config.memory
    return victims


def _throttled(pool: FunctionPool, settings: PoolSettings, *, cap: bool, used_mb: int) -> ThrottledError:
    if cap:
        return ThrottledError(
            f"all {settings.max_instances} instances of this node are busy (HXB_POOL_MAX_INSTANCES); retry later"
        )
    return ThrottledError(
        f"the node's memory budget of {settings.memory_budget_mb} MB is used up: {used_mb} MB are in use by "
        f"instances that cannot be evicted, and {pool.revision.name!r} needs {pool.revision.config.memory} MB "
        "(HXB_POOL_MEMORY_BUDGET_MB); retry later"
    )
