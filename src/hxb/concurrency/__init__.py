"""Concurrency control: workspaces and their plans, reserved concurrency, burst, throttling."""

from hxb.concurrency.admission import Admission, Ticket
from hxb.concurrency.plans import PLANS, Plan, plan_named

__all__ = ["PLANS", "Admission", "Plan", "Ticket", "plan_named"]
