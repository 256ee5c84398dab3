"""Invoker: the one way an invocation runs, whoever asked for it (the Invoke API, an HTTP
route, the async queue): admission against the concurrency limits, then the pool."""

from __future__ import annotations

from hxb.concurrency.admission import Admission
from hxb.models import FunctionRevision, InvocationRequest, InvocationResult
from hxb.pool.manager import PoolManager


class Invoker:
    def __init__(self, admission: Admission, pool: PoolManager) -> None:
        self._admission = admission
        self._pool = pool

    async def invoke(self, revision: FunctionRevision, request: InvocationRequest) -> InvocationResult:
        """Runs one invocation now, or refuses it.

        Raises:
            ThrottledError: a concurrency limit of the function or its workspace is reached
                (429 TooManyRequestsException); nothing ran.
        """
        ticket = self._admission.enter(revision)
        try:
            return await self._pool.invoke(revision, request)
        finally:
            ticket.release()
