"""Admission: whether an invocation may start now, by the limits of its function and its
workspace; the counters behind ConcurrentExecutions and Throttles. In memory, no await: it
sits on the invoke path.

The rules, per workspace on plan P (see `plans.PLANS`):

- A function with `reserved_concurrency: R` runs at most R executions at once, always
  (R = 0 throttles every invocation). They count against its reservation only.
- The other (unreserved) functions share what the reservations leave: D = P's default
  concurrency minus the workspace's reservations, at any time; above D, up to P's burst
  concurrency minus the reservations, while burst credit lasts.
- Burst credit: each execution started while D or more unreserved executions are running
  spends one credit. The workspace holds at most (burst - default) credits and regains them
  at a steady rate, from empty to full in `burst_refill_s` (60 s by default). So a workspace
  can jump to its burst concurrency at once, but it stays above its default only as long
  as its credit lasts, and bursts again once the credit has refilled.
- Whatever is over a limit is throttled at once (ThrottledError: 429, with Retry-After);
  nothing waits here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hxb.concurrency.plans import Plan
from hxb.errors import ClientError, ThrottledError
from hxb.models import FunctionRevision


class BurstCredit:
    """A token bucket of `capacity` credits, refilled from empty to full in `refill_s`."""

    def __init__(self, capacity: int, refill_s: float, now: float) -> None:
        self._capacity = capacity
        self._rate = capacity / refill_s if capacity else 0.0
        self._refill_s = refill_s
        self._tokens = float(capacity)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(float(self._capacity), self._tokens + (now - self._at) * self._rate)
        self._at = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def available(self, now: float) -> int:
        self._refill(now)
        return int(self._tokens)

    def seconds_until_one(self, now: float) -> float:
        self._refill(now)
        if self._tokens >= 1.0:
            return 0.0
        if not self._rate:
            return math.inf
        return (1.0 - self._tokens) / self._rate

    def resize(self, capacity: int, now: float) -> None:
        """A new plan: the credit grows (or shrinks) by the difference in capacity."""
        self._refill(now)
        self._tokens = max(0.0, min(float(capacity), self._tokens + capacity - self._capacity))
        self._capacity = capacity
        self._rate = capacity / self._refill_s if capacity else 0.0

    @property
    def capacity(self) -> int:
        return self._capacity


@dataclass(slots=True)
class FunctionUsage:
    running: int = 0
    throttles: int = 0


@dataclass(slots=True)
class WorkspaceUsage:
    plan: Plan
    burst: BurstCredit
    running: int = 0
    unreserved_running: int = 0
    throttles: int = 0
    reservations: dict[str, int] = field(default_factory=dict)
    functions: dict[str, FunctionUsage] = field(default_factory=dict)

    @property
    def reserved_total(self) -> int:
        return sum(self.reservations.values())

    def function(self, name: str) -> FunctionUsage:
        usage = self.functions.get(name)
        if usage is None:
            usage = self.functions[name] = FunctionUsage()
        return usage


@dataclass(frozen=True, slots=True)
class WorkspaceLimits:
    """A workspace's limits and counters as the API shows them."""

    plan: str
    default_concurrency: int
    burst_concurrency: int
    reserved_cap: int
    reserved_total: int
    unreserved_limit: int
    concurrent_executions: int
    unreserved_executions: int
    burst_credit: int
    burst_credit_max: int
    throttles: int


class Ticket:
    """One admitted execution; `release()` when it ended (twice is harmless)."""

    __slots__ = ("_function", "_released", "_reserved", "_workspace")

    def __init__(self, workspace: WorkspaceUsage, function: FunctionUsage, *, reserved: bool) -> None:
        self._workspace = workspace
        self._function = function
        self._reserved = reserved
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._function.running -= 1
        self._workspace.running -= 1
        if not self._reserved:
            self._workspace.unreserved_running -= 1


class Admission:
    def __init__(self, *, burst_refill_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._refill_s = burst_refill_s
        self._clock = clock
        self._workspaces: dict[str, WorkspaceUsage] = {}

    # --- workspaces and reservations --------------------------------------------------------------

    def set_plan(self, workspace: str, plan: Plan) -> None:
        """Registers a workspace, or moves it to another plan (its counters stay)."""
        usage = self._workspaces.get(workspace)
        now = self._clock()
        if usage is None:
            self._workspaces[workspace] = WorkspaceUsage(
                plan=plan, burst=BurstCredit(plan.burst_credit, self._refill_s, now)
            )
            return
        self.check_plan(workspace, plan)
        usage.plan = plan
        usage.burst.resize(plan.burst_credit, now)

    def check_plan(self, workspace: str, plan: Plan) -> None:
        """Raises ClientError if the workspace's reservations do not fit `plan`."""
        usage = self._workspaces.get(workspace)
        if usage is None or usage.reserved_total <= plan.reserved_cap:
            return
        holders = ", ".join(f"{name} ({n})" for name, n in sorted(usage.reservations.items()) if n)
        raise ClientError(
            f"workspace {workspace!r} reserves {usage.reserved_total} concurrent executions ({holders}); "
            f"the {plan.name} plan allows {_cap_text(plan)}: lower the reservations first"
        )

    def check_reservation(self, workspace: str, function: str, reserved: int | None) -> None:
        """Raises ClientError if `function` reserving `reserved` would exceed the plan's cap."""
        usage = self._usage(workspace)
        if not reserved:  # None: no reservation; 0: throttled, holds nothing of the pool
            return
        plan = usage.plan
        others = usage.reserved_total - usage.reservations.get(function, 0)
        if others + reserved > plan.reserved_cap:
            if plan.reserved_cap == 0:
                raise ClientError(
                    f"reserved_concurrency: reserved concurrency is not available on the {plan.name} plan "
                    f"(workspace {workspace!r}); 0 (always throttled) is the only value it accepts"
                )
            raise ClientError(
                f"reserved_concurrency: {reserved} for {function!r} would make workspace {workspace!r} reserve "
                f"{others + reserved} concurrent executions; the {plan.name} plan allows {_cap_text(plan)} "
                f"({others} reserved by other functions)"
            )

    def reserve(self, workspace: str, function: str, reserved: int | None) -> int | None:
        """Checks and records `function`'s reservation in one step (no await between them, so
        two deploys cannot both take the last of the cap). Returns the reservation it had, for
        `set_reservation` to put back if what follows fails."""
        self.check_reservation(workspace, function, reserved)
        previous = self._usage(workspace).reservations.get(function)
        self.set_reservation(workspace, function, reserved)
        return previous

    def set_reservation(self, workspace: str, function: str, reserved: int | None) -> None:
        usage = self._usage(workspace)
        if reserved:
            usage.reservations[function] = reserved
        else:
            usage.reservations.pop(function, None)

    def forget_function(self, workspace: str, function: str) -> None:
        usage = self._workspaces.get(workspace)
        if usage is not None:
            usage.reservations.pop(function, None)

    # --- admission ------------------------------------------------------------------------------

    def enter(self, revision: FunctionRevision) -> Ticket:
        """Admits one execution of `revision`, or raises ThrottledError (nothing is counted
        as running then, only the throttle)."""
        usage = self._usage(revision.workspace)
        function = usage.function(revision.name)
        reserved = revision.config.reserved_concurrency
        if reserved is not None:
            if function.running >= reserved:
                self._throttle(usage, function, _reserved_message(revision.name, reserved), retry_after_s=1.0)
            ticket = Ticket(usage, function, reserved=True)
        else:
            sustained = usage.plan.default_concurrency - usage.reserved_total
            ceiling = usage.plan.burst_concurrency - usage.reserved_total
            if usage.unreserved_running >= sustained:
                now = self._clock()
                if usage.unreserved_running >= ceiling:
                    self._throttle(
                        usage, function, _ceiling_message(revision.workspace, usage, ceiling), retry_after_s=1.0
                    )
                if not usage.burst.take(now):
                    wait_s = usage.burst.seconds_until_one(now)
                    self._throttle(
                        usage,
                        function,
                        _no_credit_message(revision.workspace, usage, sustained, wait_s),
                        retry_after_s=wait_s,
                    )
            usage.unreserved_running += 1
            ticket = Ticket(usage, function, reserved=False)
        function.running += 1
        usage.running += 1
        return ticket

    @staticmethod
    def _throttle(usage: WorkspaceUsage, function: FunctionUsage, message: str, *, retry_after_s: float) -> None:
        usage.throttles += 1
        function.throttles += 1
        raise ThrottledError(message, retry_after_s=max(1.0, min(retry_after_s, 3600.0)))

    # --- reading --------------------------------------------------------------------------------

    def workspace_limits(self, workspace: str) -> WorkspaceLimits:
        usage = self._usage(workspace)
        plan = usage.plan
        return WorkspaceLimits(
            plan=plan.name,
            default_concurrency=plan.default_concurrency,
            burst_concurrency=plan.burst_concurrency,
            reserved_cap=plan.reserved_cap,
            reserved_total=usage.reserved_total,
            unreserved_limit=plan.default_concurrency - usage.reserved_total,
            concurrent_executions=usage.running,
            unreserved_executions=usage.unreserved_running,
            burst_credit=usage.burst.available(self._clock()),
            burst_credit_max=usage.burst.capacity,
            throttles=usage.throttles,
        )

    def function_usage(self, workspace: str, function: str) -> FunctionUsage:
        usage = self._workspaces.get(workspace)
        found = usage.functions.get(function) if usage is not None else None
        return found if found is not None else FunctionUsage()

    def _usage(self, workspace: str) -> WorkspaceUsage:
        usage = self._workspaces.get(workspace)
        if usage is None:
            raise ClientError(f"workspace {workspace!r} does not exist")
        return usage


def _cap_text(plan: Plan) -> str:
    return f"at most {plan.reserved_cap} in total" if plan.reserved_cap else "no reservations"


def _reserved_message(function: str, reserved: int) -> str:
    if reserved == 0:
        return f"Rate Exceeded: function {function!r} has reserved_concurrency 0, so every invocation is throttled"
    return f"Rate Exceeded: function {function!r} is at its reserved concurrency of {reserved} concurrent executions"


def _ceiling_message(workspace: str, usage: WorkspaceUsage, ceiling: int) -> str:
    return (
        f"Rate Exceeded: workspace {workspace!r} ({usage.plan.name} plan) runs {usage.unreserved_running} "
        f"executions of unreserved functions, its burst concurrency of {ceiling}"
        + (f" (burst {usage.plan.burst_concurrency} - {usage.reserved_total} reserved)" if usage.reserved_total else "")
    )


def _no_credit_message(workspace: str, usage: WorkspaceUsage, sustained: int, wait_s: float) -> str:
    return (
        f"Rate Exceeded: workspace {workspace!r} ({usage.plan.name} plan) runs {usage.unreserved_running} "
        f"executions of unreserved functions, at or above its default concurrency of {sustained}, and its "
        f"burst credit is spent (next credit in {wait_s:.1f} s)"
    )
