"""The plans of the concurrency table: what a workspace may run at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from hxb.errors import ClientError


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    # Concurrent executions the workspace may always run.
    default_concurrency: int
    # Most concurrency its functions may reserve in total (0: reservations not available).
    reserved_cap: int
    # Most concurrent executions at any moment, while burst credit lasts.
    burst_concurrency: int

    @property
    def burst_credit(self) -> int:
        """Executions a workspace may start above its default concurrency before it must wait
        for the credit to refill."""
        return self.burst_concurrency - self.default_concurrency


PLANS: Final = {
    "single": Plan("single", default_concurrency=10, reserved_cap=0, burst_concurrency=50),
    "team": Plan("team", default_concurrency=100, reserved_cap=50, burst_concurrency=500),
    "enterprise": Plan("enterprise", default_concurrency=1000, reserved_cap=500, burst_concurrency=3000),
}


def plan_named(name: str) -> Plan:
    """`single`, `team` or `enterprise` (`single_user`, as the seed spells it, is `single`).

    Raises:
        ClientError: no such plan.
    """
    plan = PLANS.get("single" if name == "single_user" else name)
    if plan is None:
        raise ClientError(f"unknown plan {name!r}: expected single, team or enterprise")
    return plan
