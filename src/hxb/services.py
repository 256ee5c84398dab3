"""Services: the platform's components, built from Settings and wired together for one
`hxb serve` process (store, runtime catalog, sandbox factory, log sink, pool, router,
registry), with their start and stop order in one place."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hxb._locks import HostLock, LockHeld
from hxb.concurrency.admission import Admission
from hxb.concurrency.workspaces import Workspaces
from hxb.config import Settings
from hxb.errors import DataDirInUseError
from hxb.invoker import Invoker
from hxb.logs.sink import LogSink
from hxb.models import FunctionRevision
from hxb.packaging import PackageLimits, pack_directory
from hxb.pool.manager import PoolManager
from hxb.queue.dispatcher import AsyncDispatcher
from hxb.registry import FunctionRegistry
from hxb.router import Router
from hxb.runtimes import RuntimeCatalog
from hxb.sandbox.base import SandboxFactory
from hxb.sandbox.select import open_sandbox
from hxb.store import Store, open_store

log = logging.getLogger(__name__)

_LOG_PRUNE_INTERVAL_S = 3600.0
DEMO_FUNCTION = "hello"


@dataclass(kw_only=True)
class Services:
    settings: Settings
    store: Store
    catalog: RuntimeCatalog
    factory: SandboxFactory
    log_sink: LogSink
    pool: PoolManager
    router: Router
    registry: FunctionRegistry
    admission: Admission
    workspaces: Workspaces
    invoker: Invoker
    queue: AsyncDispatcher
    deploy_demo: bool = False
    sandbox_degraded: list[str] = field(default_factory=list)
    load_problems: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _lock: HostLock | None = None
    _started: bool = False

    @property
    def sandbox_name(self) -> str:
        return self.factory.name

    @classmethod
    async def open(cls, settings: Settings) -> Services:
        # Absolute from here on: instances get paths under it and run in another directory.
        settings = dataclasses.replace(settings, data_dir=settings.data_dir.resolve())
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_data_dir(data_dir)
        try:
            return await cls._open_locked(settings, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    async def _open_locked(cls, settings: Settings, lock: HostLock) -> Services:
        data_dir = settings.data_dir
        # Left over by a platform that was killed: nothing in them is still in use.
        for leftover in ("instances", "uploads"):
            shutil.rmtree(data_dir / leftover, ignore_errors=True)
        store = await open_store(settings.store_url)
        catalog = await RuntimeCatalog.discover(data_dir, settings.runtimes.python_search_paths)
        choice = await open_sandbox(settings.sandbox, data_dir, catalog)
        factory = choice.factory
        sink = LogSink(
            store.append_logs,
            flush_interval_s=settings.logs.flush_interval_s,
            max_pending_bytes=settings.logs.max_pending_bytes,
        )
        pool = PoolManager(settings.pool, settings.logs, factory, catalog, sink.emit, log_flow=sink)
        router = Router()
        admission = Admission(burst_refill_s=settings.concurrency.burst_refill_s)
        workspaces = Workspaces(store, admission)
        invoker = Invoker(admission, pool)
        # Asynchronous events run through admission too: a throttled one waits in the queue.
        queue = AsyncDispatcher(settings.async_, store=store, router=router, invoke=invoker.invoke)
        registry = FunctionRegistry(
            data_dir=data_dir,
            region=settings.region,
            store=store,
            catalog=catalog,
            pool=pool,
            router=router,
            admission=admission,
            workspaces=workspaces,
            package_limits=PackageLimits(max_zipped_bytes=settings.gateway.max_package_bytes),
        )
        return cls(
            settings=settings,
            store=store,
            catalog=catalog,
            factory=factory,
            log_sink=sink,
            pool=pool,
            router=router,
            registry=registry,
            admission=admission,
            workspaces=workspaces,
            invoker=invoker,
            queue=queue,
            sandbox_degraded=choice.degraded,
            _lock=lock,
        )

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.log_sink.start()
        self.pool.start()
        await self.workspaces.load(self.settings.workspace, self.settings.concurrency.default_plan)
        self.workspaces.on_plan_changed(self.registry.apply_plan)
        self.load_problems = await self.registry.load()
        for problem in self.load_problems:
            log.warning(problem)
        # After the registry: events left pending by the last run need their functions routed.
        await self.queue.start()
        # The runtimes deployed functions use get their zygotes now, not at the first request.
        runtimes = {r.runtime.name: r.runtime for r in self.router.list()}
        default = self.catalog.list()
        if not runtimes and default:
            runtimes = {r.name: r for r in default if r.name == "python3.11"}
        await self.factory.prepare(list(runtimes.values()))
        task = asyncio.get_running_loop().create_task(self._prune_logs_forever(), name="hxb-log-prune")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.deploy_demo:
            await self.install_demo()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Every step runs even when one before it failed: what the sandbox holds on the host
        # (namespaces, mounts, cgroups) must go whatever happened to the logs.
        for step in (
            self.queue.stop,
            self.registry.close,
            self.pool.close,
            self.log_sink.close,
            self.factory.close,
            self.store.close,
        ):
            try:
                await step()
            except Exception:  # a boundary: shutdown goes on
                log.exception("stopping a component failed", extra={"component": step.__qualname__})
        if self._lock is not None:
            self._lock.release()

    async def _prune_logs_forever(self) -> None:
        while True:
            cutoff_ms = int((time.time() - self.settings.logs.retention_s) * 1000)
            try:
                removed = await self.store.delete_logs_before(cutoff_ms)
                if removed:
                    log.info("pruned old log events", extra={"count": removed})
            except Exception:  # a boundary: pruning failing must not stop the platform
                log.exception("pruning old log events failed")
            await asyncio.sleep(_LOG_PRUNE_INTERVAL_S)

    async def install_demo(self) -> FunctionRevision:
        """Deploys the bundled demo function (idempotent: same code, same result)."""
        source = resources.files("hxb") / "demo" / DEMO_FUNCTION
        with tempfile.TemporaryDirectory(dir=self.settings.data_dir) as tmp:
            zip_path = Path(tmp) / "demo.zip"
            await asyncio.to_thread(pack_directory, Path(str(source)), zip_path)
            revision, _ = await self.registry.deploy(self.settings.workspace, zip_path)
        return revision


def _lock_data_dir(data_dir: Path) -> HostLock:
    try:
        return HostLock.acquire(data_dir / "hxb.lock", describe="hxb serve")
    except LockHeld as held:
        raise DataDirInUseError(
            f"the data dir {data_dir} is in use by another hxb platform ({held.holder}):"
            " stop it, or give this one its own --data-dir"
        ) from None
