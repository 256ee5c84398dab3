"""The environment of an instance: the seed's `HXB_*` variables, Lambda's own (so that code
written for Lambda, Powertools or a runtime interface client runs), then the function's."""

from __future__ import annotations

from hxb.models import FunctionRevision
from hxb.sandbox.base import SandboxPaths


def instance_environment(revision: FunctionRevision, paths: SandboxPaths, *, stream: str) -> dict[str, str]:
    cfg = revision.config
    memory = str(cfg.memory)
    timeout = str(cfg.timeout)
    env = {
        "PATH": f"/usr/local/bin:/usr/bin:/bin:{paths.opt_root}/bin",
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "TMPDIR": paths.tmp_dir,
        "LAMBDA_TASK_ROOT": paths.task_root,
        "LAMBDA_RUNTIME_DIR": paths.runtime_root,
        "_HANDLER": cfg.handler,
        "_HXB_OPT_ROOT": paths.opt_root,
        # Child Python processes (which do not run our bootstrap) still find the function's modules.
        "PYTHONPATH": f"{paths.task_root}:{paths.opt_root}/python",
        "HXB_FUNCTION_NAME": revision.name,
        "HXB_FUNCTION_VERSION": revision.version,
        "HXB_WORKSPACE": revision.workspace,
        "HXB_REGION": revision.region,
        "HXB_MEMORY_SIZE": memory,
        "HXB_TIMEOUT": timeout,
        "HXB_LOG_LEVEL": cfg.log_level,
        # Above 1, the runtime serves that many invocations at once (async handlers only).
        "HXB_CONCURRENCY_PER_INSTANCE": str(cfg.concurrency_per_instance),
        "AWS_LAMBDA_FUNCTION_NAME": revision.name,
        "AWS_LAMBDA_FUNCTION_VERSION": revision.version,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": memory,
        "AWS_LAMBDA_FUNCTION_TIMEOUT": timeout,
        "AWS_LAMBDA_LOG_GROUP_NAME": revision.log_group,
        "AWS_LAMBDA_LOG_STREAM_NAME": stream,
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{revision.runtime.name}",
        "AWS_REGION": revision.region,
        "AWS_DEFAULT_REGION": revision.region,
    }
    # Reserved names are refused at deploy (hxb.spec), so user values never shadow ours.
    env.update(cfg.environment)
    return env
