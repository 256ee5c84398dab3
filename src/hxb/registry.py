"""FunctionRegistry: deploys, reconfigures and deletes functions, keeping the store, the code
directory, the router and the pool in step. The one writer of function state."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from hxb.concurrency.admission import Admission
from hxb.concurrency.plans import Plan
from hxb.concurrency.workspaces import Workspaces
from hxb.errors import ClientError, FunctionExistsError, FunctionNotFoundError, PackageError, SpecError
from hxb.models import LATEST, FunctionRevision
from hxb.packaging import PackageLimits, read_config_text, unpack_package
from hxb.pool.manager import PoolManager
from hxb.router import Router
from hxb.runtimes import RuntimeCatalog, RuntimeInfo
from hxb.runtimes.catalog import compile_tree
from hxb.spec import FunctionConfig, apply_config_patch, is_python_runtime, parse_function_file
from hxb.store import FunctionRecord, Store

log = logging.getLogger(__name__)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FunctionRegistry:
    def __init__(
        self,
        *,
        data_dir: Path,
        region: str,
        store: Store,
        catalog: RuntimeCatalog,
        pool: PoolManager,
        router: Router,
        admission: Admission,
        workspaces: Workspaces,
        package_limits: PackageLimits,
    ) -> None:
        self._code_root = data_dir / "code"
        self._code_root.mkdir(parents=True, exist_ok=True)
        self._region = region
        self._store = store
        self._catalog = catalog
        self._pool = pool
        self._router = router
        self._admission = admission
        self._workspaces = workspaces
        self._limits = package_limits
        # Deploys of one function run one at a time; different functions deploy in parallel.
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        # Code directories a deploy is installing right now: not garbage, though no function uses them yet.
        self._installing: Counter[str] = Counter()
        self._gc_tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stops waiting to delete retired code; what is left is swept at the next start."""
        for task in list(self._gc_tasks):
            task.cancel()
        await asyncio.gather(*self._gc_tasks, return_exceptions=True)

    async def load(self) -> list[str]:
        """Routes every stored function (after a restart). Returns the problems found: a
        function whose runtime or code has gone is skipped, loudly, not fatal."""
        problems: list[str] = []
        for record in await self._store.list_functions():
            try:
                revision = self._revision_from(record)
            except ClientError as exc:
                problems.append(f"function {record.name!r} not loaded: {exc}")
                continue
            self._router.put(revision)
            try:
                self._admission.check_reservation(record.workspace, record.name, revision.config.reserved_concurrency)
            except ClientError as exc:  # e.g. the plan changed under it: the function still runs
                problems.append(f"function {record.name!r}: {exc}")
            self._admission.set_reservation(record.workspace, record.name, revision.config.reserved_concurrency)
            try:
                self._provision(revision)
            except ClientError as exc:  # its workspace is gone from the store
                problems.append(f"function {record.name!r}: {exc}")
        await self._sweep_code()
        return problems

    async def _sweep_code(self) -> None:
        """Deletes code directories no function uses (left by a stop before they drained)."""
        for path in list(self._code_root.iterdir()):
            if path.name.startswith((".staging-", ".trash-")):
                await asyncio.to_thread(shutil.rmtree, path, True)
            elif path.is_dir():
                await self._collect_code(path.name)

    def _revision_from(self, record: FunctionRecord) -> FunctionRevision:
        config = FunctionConfig.model_validate(record.config)
        code_dir = self._code_root / record.code_sha256
        if not code_dir.is_dir():
            raise PackageError(f"its code {record.code_sha256[:12]} is missing from {self._code_root}")
        return FunctionRevision(
            workspace=record.workspace,
            name=record.name,
            version=LATEST,
            revision_id=record.revision_id,
            config=config,
            code_dir=code_dir,
            code_sha256=record.code_sha256,
            code_size_bytes=record.code_size_bytes,
            runtime=self._catalog.get(config.runtime),
            region=self._region,
            last_modified=record.last_modified,
        )

    # --- deploy ---------------------------------------------------------------------------------

    async def deploy(
        self, workspace: str, zip_path: Path, *, expected_name: str | None = None, create_only: bool = False
    ) -> tuple[FunctionRevision, bool]:
        """Validates and unpacks a package and makes it the function's $LATEST. Returns the
        new revision and whether the function was created. When this returns, the function
        can be invoked."""
        member, text = await asyncio.to_thread(read_config_text, zip_path, limits=self._limits)
        # Off the loop: validation is bounded, but a large document still takes a while.
        config = await asyncio.to_thread(parse_function_file, text, source=member)
        if expected_name is not None and config.name != expected_name:
            raise SpecError(
                f"{member}: function.name is {config.name!r} but the request is for {expected_name!r}",
                source=member,
            )
        runtime = self._check_deployable(config)
        self._workspaces.get(workspace)
        async with self._locks[(workspace, config.name)]:
            existing = await self._store.get_function(workspace, config.name)
            if existing is not None and create_only:
                raise FunctionExistsError(config.name)
            self._admission.check_reservation(workspace, config.name, config.reserved_concurrency)
            sha = await asyncio.to_thread(_file_sha256, zip_path)
            self._installing[sha] += 1
            try:
                size = await self._install_code(zip_path, sha)
                if is_python_runtime(config.runtime):
                    # Compiled now, so that no cold start pays for compiling the code or the bootstrap.
                    await compile_tree(runtime, [self._code_root / sha])
                    await self._catalog.ensure_compiled(runtime)
                revision = await self._commit_new(workspace, config, sha, size, existing)
            finally:
                self._installing[sha] -= 1
                if not self._installing[sha]:
                    del self._installing[sha]
        return revision, existing is None

    async def _commit_new(
        self, workspace: str, config: FunctionConfig, sha: str, size: int, existing: FunctionRecord | None
    ) -> FunctionRevision:
        now = _now_iso()
        record = FunctionRecord(
            workspace=workspace,
            name=config.name,
            revision_id=uuid.uuid4().hex,
            config=config.model_dump(mode="json", by_alias=True),
            code_sha256=sha,
            code_size_bytes=size,
            created_at=existing.created_at if existing else now,
            last_modified=now,
        )
        return await self._commit(record, previous=existing)

    def _check_deployable(self, config: FunctionConfig) -> RuntimeInfo:
        runtime = self._catalog.get(config.runtime)
        if config.layers:
            raise ClientError(
                f"layer {config.layers[0]!r} not found: this server has no layers yet (remove function.layers)"
            )
        return runtime

    async def _install_code(self, zip_path: Path, sha: str) -> int:
        """Unpacks into `code/<sha256 of the zip>`; an identical package is unpacked once.
        The caller has marked `sha` as installing, so garbage collection keeps it."""
        staging = self._code_root / f".staging-{uuid.uuid4().hex}"
        try:
            unpacked = await asyncio.to_thread(unpack_package, zip_path, staging, limits=self._limits)
            target = self._code_root / sha
            if target.is_dir():
                await asyncio.to_thread(shutil.rmtree, staging, True)
            else:
                staging.rename(target)
            return unpacked.unzipped_bytes
        finally:
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _commit(self, record: FunctionRecord, *, previous: FunctionRecord | None) -> FunctionRevision:
        revision = self._revision_from(record)
        previous_reservation = self._admission.reserve(
            record.workspace, record.name, revision.config.reserved_concurrency
        )
        try:
            await self._store.put_function(record)
        except BaseException:
            self._admission.set_reservation(record.workspace, record.name, previous_reservation)
            raise
        old = self._router.put(revision)
        if old is not None and old.key != revision.key:
            self._retire(old)
        self._provision(revision)
        return revision

    def _provision(self, revision: FunctionRevision) -> None:
        """Keeps the revision's provisioned instances at what its config asks for on its
        workspace's plan (on the event loop, no await: the pool starts them in the background)."""
        plan = self._workspaces.plan_of(revision.workspace).name
        self._pool.set_provisioned(revision, revision.config.provisioned_for_plan(plan))

    async def apply_plan(self, workspace: str, plan: Plan) -> None:
        """A workspace changed plan: provisioned counts given per plan follow it."""
        for revision in self._router.list(workspace):
            self._pool.set_provisioned(revision, revision.config.provisioned_for_plan(plan.name))

    def _retire(self, old: FunctionRevision) -> None:
        """Stops the old revision's instances; its code goes once the last of them exited
        (an invocation still running on it keeps importing and reading its files)."""
        self._pool.retire(old.key)

        async def collect_when_drained() -> None:
            await self._pool.wait_drained(old.key)
            await self._collect_code(old.code_sha256)

        task = asyncio.get_running_loop().create_task(collect_when_drained(), name=f"hxb-gc-{old.name}")
        self._gc_tasks.add(task)
        task.add_done_callback(self._gc_tasks.discard)

    async def _collect_code(self, code_sha256: str) -> None:
        """Deletes a code directory nothing uses any more. No await between the check and the
        rename, so no deploy or instance start can slip in between; the removal itself runs
        in a thread, on a name nothing refers to."""
        if code_sha256 in self._installing or self._pool.code_in_use(code_sha256):
            return
        if any(r.code_sha256 == code_sha256 for r in self._router.list()):
            return
        trash = self._code_root / f".trash-{uuid.uuid4().hex}"
        try:
            (self._code_root / code_sha256).rename(trash)
        except FileNotFoundError:
            return
        await asyncio.to_thread(shutil.rmtree, trash, True)

    # --- configuration, delete, read ---------------------------------------------------------------

    async def update_config(self, workspace: str, name: str, patch: Mapping[str, object]) -> FunctionRevision:
        async with self._locks[(workspace, name)]:
            existing = await self._store.get_function(workspace, name)
            if existing is None:
                raise FunctionNotFoundError(name)
            current = FunctionConfig.model_validate(existing.config)
            config = apply_config_patch(current, patch)
            self._check_deployable(config)
            self._admission.check_reservation(workspace, name, config.reserved_concurrency)
            # Concurrency and async settings do not change what an instance runs: the revision
            # (and so its warm instances) stays.
            running_changes = _changed_fields(current, config) - _FIELDS_INSTANCES_IGNORE
            record = FunctionRecord(
                workspace=workspace,
                name=name,
                revision_id=uuid.uuid4().hex if running_changes else existing.revision_id,
                config=config.model_dump(mode="json", by_alias=True),
                code_sha256=existing.code_sha256,
                code_size_bytes=existing.code_size_bytes,
                created_at=existing.created_at,
                last_modified=_now_iso(),
            )
            if config.runtime != current.runtime and is_python_runtime(config.runtime):
                await compile_tree(self._catalog.get(config.runtime), [self._code_root / record.code_sha256])
            return await self._commit(record, previous=existing)

    async def delete(self, workspace: str, name: str) -> None:
        async with self._locks[(workspace, name)]:
            existing = await self._store.get_function(workspace, name)
            if existing is None:
                raise FunctionNotFoundError(name)
            await self._store.delete_function(workspace, name)
            self._admission.forget_function(workspace, name)
            old = self._router.remove(workspace, name)
            if old is not None:
                self._retire(old)
            await self._store.delete_logs(workspace, name)

    def get(self, workspace: str, name: str) -> FunctionRevision:
        return self._router.resolve(workspace, name)

    def list(self, workspace: str | None = None) -> list[FunctionRevision]:
        return self._router.list(workspace)


# Settings an instance never sees: changing only these keeps the function's revision.
_FIELDS_INSTANCES_IGNORE = frozenset({"reserved_concurrency", "provisioned_concurrency", "async", "description"})


def _changed_fields(before: FunctionConfig, after: FunctionConfig) -> set[str]:
    old = before.model_dump(mode="json", by_alias=True)
    new = after.model_dump(mode="json", by_alias=True)
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
