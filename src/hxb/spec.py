"""The user-facing function configuration, `hexabase.yaml`: its models, its parsing into errors a user can act
on, and its JSON Schema for editors.

Runtimes are checked for their *form* only here; whether a runtime is installed is decided at deploy time.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import ErrorDetails, PydanticCustomError

from hxb.errors import SpecError

MEMORY_MIN_MB: Final = 128
MEMORY_MAX_MB: Final = 10240
# The seed's runtime table gives Java and .NET 512MB-10GB: their VMs do not start reliably below that.
MANAGED_RUNTIME_MEMORY_MIN_MB: Final = 512
TIMEOUT_MIN_S: Final = 1
TIMEOUT_MAX_S: Final = 900
DEFAULT_TIMEOUT_S: Final = 3
EPHEMERAL_STORAGE_MIN_MB: Final = 512
EPHEMERAL_STORAGE_MAX_MB: Final = 10240
ENVIRONMENT_MAX_BYTES: Final = 4096
MAX_LAYERS: Final = 5
NAME_MAX_CHARS: Final = 64
HANDLER_MAX_CHARS: Final = 128
DESCRIPTION_MAX_CHARS: Final = 256
ASYNC_MAX_RETRIES: Final = 2
ASYNC_MAX_EVENT_AGE_MIN_S: Final = 60
ASYNC_MAX_EVENT_AGE_MAX_S: Final = 21600
CONCURRENCY_PER_INSTANCE_MAX: Final = 1000
DEFAULT_RUNTIME: Final = "python3.11"
DEFAULT_HANDLER: Final = "index.handler"
PLANS: Final = ("single", "team", "enterprise")

_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

# The patterns double as JSON Schema `pattern`s, so they stay within what ECMA-262 regexes understand.
_NAME_PATTERN: Final = r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$"
_RUNTIME_PATTERN: Final = (
    r"^(python3\.([7-9]|[1-9][0-9]+)|nodejs[1-9][0-9]*\.x|go1\.x|java[1-9][0-9]*|ruby[1-9][0-9]*\.[0-9]+"
    r"|dotnet[1-9][0-9]*(\.0)?|provided|provided\.al2|provided\.al2023)$"
)
_HANDLER_PATTERN: Final = r"^\S+$"
_ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
_LAYER_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}(:[1-9][0-9]*)?$"
_SECRET_PATTERN: Final = r"^[A-Za-z0-9/_+=.@-]{1,512}$"  # noqa: S105 -- a pattern for names, not a credential
_SUCCESS_DESTINATION_PATTERN: Final = r"^function:[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$"
_FAILURE_DESTINATION_PATTERN: Final = r"^(dlq|function:[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)$"

# These are set by hxb inside every instance; letting a user override them would break the runtime
# (`_HANDLER`, `LAMBDA_*`) or let the function lie about its own identity in logs and traces.
_RESERVED_ENV_PREFIXES: Final = ("HXB_", "AWS_")
_RESERVED_ENV_NAMES: Final = frozenset({"_HANDLER", "_X_AMZN_TRACE_ID", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR"})

# Error types of our own validators. The second kind already says what was wrong with the value (or the
# value is a whole list or mapping), so the renderer does not append "(got ...)".
_RULE: Final = "hxb_rule"
_RULE_NO_INPUT: Final = "hxb_rule_no_input"

_SHOWN_VALUE_MAX_CHARS: Final = 60


def is_python_runtime(runtime: str) -> bool:
    """Whether `runtime` is a Python runtime (whose handler must be `module.function`)."""
    return runtime.startswith("python")


def minimum_memory_mb(runtime: str) -> int:
    """The smallest memory size `runtime` may be given."""
    if runtime.startswith(("java", "dotnet")):
        return MANAGED_RUNTIME_MEMORY_MIN_MB
    return MEMORY_MIN_MB


def _rule(message: str) -> PydanticCustomError:
    return PydanticCustomError(_RULE, message)


def _rule_no_input(message: str) -> PydanticCustomError:
    return PydanticCustomError(_RULE_NO_INPUT, message)


# --- field types --------------------------------------------------------------------------------------
# Each type runs a "before" validator that owns the error message, then pydantic's own constraints, which
# therefore never fail but still end up in the JSON Schema for editors.


def _whole_number(minimum: int, maximum: int | None, unit: str = "") -> Callable[[object], int]:
    bounds = f"of {minimum} or more{unit}" if maximum is None else f"between {minimum} and {maximum}{unit}"

    def check(value: object) -> int:
        # bool is an int subclass, and YAML turns `yes`/`true` into one: never a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _rule(f"must be a whole number {bounds}")
        if value < minimum or (maximum is not None and value > maximum):
            raise _rule(f"must be {bounds.removeprefix('of ')}")
        return value

    return check


def _text(rule: str, pattern: str) -> Callable[[object], str]:
    compiled = re.compile(pattern)

    def check(value: object) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise _rule(rule)
        return value

    return check


def _short_text(max_chars: int) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or len(value) > max_chars:
            raise _rule(f"must be text of at most {max_chars} characters")
        return value

    return check


_NAME_RULE: Final = (
    f"must be 1 to {NAME_MAX_CHARS} lowercase letters, digits and '-', starting and ending with a letter or digit"
)

_Name = Annotated[
    str,
    Field(min_length=1, max_length=NAME_MAX_CHARS, pattern=_NAME_PATTERN),
    BeforeValidator(_text(_NAME_RULE, _NAME_PATTERN)),
]
_Runtime = Annotated[
    str,
    Field(pattern=_RUNTIME_PATTERN),
    BeforeValidator(
        _text(
            "must be a runtime such as python3.11, nodejs20.x, go1.x, java17, ruby3.2, dotnet8 or provided.al2023",
            _RUNTIME_PATTERN,
        )
    ),
]
_Handler = Annotated[
    str,
    Field(min_length=1, max_length=HANDLER_MAX_CHARS, pattern=_HANDLER_PATTERN),
    BeforeValidator(
        _text(f"must be 1 to {HANDLER_MAX_CHARS} characters without spaces", rf"\S{{1,{HANDLER_MAX_CHARS}}}")
    ),
]
_Description = Annotated[
    str,
    Field(max_length=DESCRIPTION_MAX_CHARS),
    BeforeValidator(_short_text(DESCRIPTION_MAX_CHARS)),
]
_MemoryMB = Annotated[
    int, Field(ge=MEMORY_MIN_MB, le=MEMORY_MAX_MB), BeforeValidator(_whole_number(MEMORY_MIN_MB, MEMORY_MAX_MB, " MB"))
]
_TimeoutS = Annotated[
    int,
    Field(ge=TIMEOUT_MIN_S, le=TIMEOUT_MAX_S),
    BeforeValidator(_whole_number(TIMEOUT_MIN_S, TIMEOUT_MAX_S, " seconds")),
]
_EphemeralStorageMB = Annotated[
    int,
    Field(ge=EPHEMERAL_STORAGE_MIN_MB, le=EPHEMERAL_STORAGE_MAX_MB),
    BeforeValidator(_whole_number(EPHEMERAL_STORAGE_MIN_MB, EPHEMERAL_STORAGE_MAX_MB, " MB")),
]
_Count = Annotated[int, Field(ge=0), BeforeValidator(_whole_number(0, None))]
_Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_whole_number(1, 65535))]
_MaxRetries = Annotated[int, Field(ge=0, le=ASYNC_MAX_RETRIES), BeforeValidator(_whole_number(0, ASYNC_MAX_RETRIES))]
_MaxEventAgeS = Annotated[
    int,
    Field(ge=ASYNC_MAX_EVENT_AGE_MIN_S, le=ASYNC_MAX_EVENT_AGE_MAX_S),
    BeforeValidator(_whole_number(ASYNC_MAX_EVENT_AGE_MIN_S, ASYNC_MAX_EVENT_AGE_MAX_S, " seconds")),
]
_ConcurrencyPerInstance = Annotated[
    int,
    Field(ge=1, le=CONCURRENCY_PER_INSTANCE_MAX),
    BeforeValidator(_whole_number(1, CONCURRENCY_PER_INSTANCE_MAX)),
]
_Layer = Annotated[
    str,
    Field(pattern=_LAYER_PATTERN),
    BeforeValidator(
        _text("must be a layer name of 1 to 64 letters, digits, '_' or '-', optionally ':<version>'", _LAYER_PATTERN)
    ),
]
_Secret = Annotated[
    str,
    Field(pattern=_SECRET_PATTERN),
    BeforeValidator(
        _text("must be a secret name of 1 to 512 letters, digits or any of / _ + = . @ -", _SECRET_PATTERN)
    ),
]
_NetworkId = Annotated[
    str,
    Field(min_length=1, max_length=255, pattern=r"^\S+$"),
    BeforeValidator(_text("must be an identifier of 1 to 255 characters without spaces", r"\S{1,255}")),
]
_SuccessDestination = Annotated[
    str,
    Field(pattern=_SUCCESS_DESTINATION_PATTERN),
    BeforeValidator(
        _text("must be function:<function-name> ('dlq' is only a failure destination)", _SUCCESS_DESTINATION_PATTERN)
    ),
]
_FailureDestination = Annotated[
    str,
    Field(pattern=_FAILURE_DESTINATION_PATTERN),
    BeforeValidator(_text("must be function:<function-name> or dlq", _FAILURE_DESTINATION_PATTERN)),
]


def _check_env_name(value: object) -> str:
    if not isinstance(value, str) or not re.match(_ENV_NAME_PATTERN, value):
        raise _rule("is not a valid variable name: use letters, digits and '_', not starting with a digit")
    if value.startswith(_RESERVED_ENV_PREFIXES) or value in _RESERVED_ENV_NAMES:
        reserved = ", ".join(sorted(_RESERVED_ENV_NAMES))
        raise _rule(f"is reserved for the platform (names starting with HXB_ or AWS_, and {reserved})")
    return value


def _coerce_env_value(value: object) -> str:
    # Users write `PORT: 8080` or `DEBUG: true` and mean the text the process will see, so scalars are
    # turned into the text a shell would show; YAML's spelling of booleans is kept rather than Python's.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    raise _rule("must be a string, number or boolean")


_EnvName = Annotated[str, Field(pattern=_ENV_NAME_PATTERN), BeforeValidator(_check_env_name)]
_EnvValue = Annotated[
    str,
    BeforeValidator(_coerce_env_value),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]


def _environment_size_bytes(environment: Mapping[str, str]) -> int:
    return sum(len(key.encode()) + len(value.encode()) for key, value in environment.items())


def _check_environment_size(environment: dict[str, str]) -> dict[str, str]:
    size_bytes = _environment_size_bytes(environment)
    if size_bytes > ENVIRONMENT_MAX_BYTES:
        raise _rule_no_input(
            f"total size is {size_bytes} bytes, over the {ENVIRONMENT_MAX_BYTES}-byte "
            f"({ENVIRONMENT_MAX_BYTES // 1024} KB) limit"
        )
    return environment


def _check_layer_count(value: object) -> object:
    # Checked before the items, so a list that is too long gets this one message rather than
    # one per item; anything that is not a list is left for pydantic's type check.
    if isinstance(value, list) and len(value) > MAX_LAYERS:
        raise _rule_no_input(f"at most {MAX_LAYERS} layers are allowed (got {len(value)})")
    return value


def _check_layer_duplicates(layers: list[str]) -> list[str]:
    # Two versions of one layer would unpack over each other in /opt, so the name alone must be unique.
    seen: set[str] = set()
    for layer in layers:
        name = layer.partition(":")[0]
        if name in seen:
            raise _rule_no_input(f"layer {name!r} is listed more than once")
        seen.add(name)
    return layers


def _normalise_log_level(value: object) -> object:
    if isinstance(value, str):
        upper = value.upper()
        return "WARN" if upper == "WARNING" else upper
    return value


def _check_cidr(value: object) -> str:
    if not isinstance(value, str):
        raise _rule("must be an IPv4 or IPv6 network such as 10.0.0.0/8 or 2001:db8::/32")
    try:
        # strict=False: `10.1.2.3/8` means the /8 around that address, which is what users mean.
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise _rule("must be an IPv4 or IPv6 network such as 10.0.0.0/8 or 2001:db8::/32") from None


_Cidr = Annotated[str, BeforeValidator(_check_cidr)]
_LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARN", "ERROR"],
    BeforeValidator(_normalise_log_level),
    # Any case is accepted, so the schema lists the spellings people write rather than only the stored one.
    WithJsonSchema(
        {
            "type": "string",
            "enum": ["DEBUG", "INFO", "WARN", "WARNING", "ERROR", "debug", "info", "warn", "warning", "error"],
        }
    ),
]


# A list or mapping whose entries are all commented out is YAML null: the user means "none", not a type error.
_NULL_IS_EMPTY_LIST: Final = BeforeValidator(lambda value: [] if value is None else value)
_NULL_IS_EMPTY_DICT: Final = BeforeValidator(lambda value: {} if value is None else value)
_PortList = Annotated[list[_Port], _NULL_IS_EMPTY_LIST]
_NetworkIdList = Annotated[list[_NetworkId], _NULL_IS_EMPTY_LIST]
_SecretList = Annotated[list[_Secret], _NULL_IS_EMPTY_LIST]


# --- models -------------------------------------------------------------------------------------------

# frozen is given twice: in model_config for pydantic, and as a class keyword so mypy knows it too.
_MODEL_CONFIG: Final = ConfigDict(extra="forbid", frozen=True)


def _single_user_in_schema(schema: JsonDict) -> None:
    # `single_user` is accepted as a second spelling of `single` (the seed writes it), so editors must not
    # flag it as an unknown key.
    properties = schema.get("properties")
    if isinstance(properties, dict) and isinstance(single := properties.get("single"), dict):
        properties["single_user"] = {**single, "description": "Same as single (older spelling)."}


class ProvisionedByPlan(BaseModel, frozen=True):
    """Warm instances kept ready for each workspace plan."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_single_user_in_schema)

    single: _Count = Field(
        default=0,
        validation_alias=AliasChoices("single", "single_user"),
        description="Warm instances on the single plan (also spelled single_user).",
    )
    team: _Count = Field(default=0, description="Warm instances on the team plan.")
    enterprise: _Count = Field(default=0, description="Warm instances on the enterprise plan.")

    @model_validator(mode="before")
    @classmethod
    def _one_spelling_of_single(cls, data: object) -> object:
        if isinstance(data, Mapping) and "single" in data and "single_user" in data:
            raise _rule_no_input("give either single or single_user, not both")
        return data


# Tags of the `provisioned_concurrency` union. pydantic puts them in error locations, where the renderer
# removes them again: a user never wrote them.
_COUNT_TAG: Final = "<count>"
_PER_PLAN_TAG: Final = "<per-plan>"


def _provisioned_kind(value: object) -> str | None:
    if isinstance(value, Mapping | ProvisionedByPlan):
        return _PER_PLAN_TAG
    if isinstance(value, int) and not isinstance(value, bool):
        return _COUNT_TAG
    return None


_ProvisionedConcurrency = Annotated[
    Annotated[_Count, Tag(_COUNT_TAG)] | Annotated[ProvisionedByPlan, Tag(_PER_PLAN_TAG)],
    Discriminator(
        _provisioned_kind,
        custom_error_type=_RULE,
        custom_error_message="must be a whole number of 0 or more, or a mapping of plan (single, team, enterprise) "
        "to a whole number",
    ),
]


class EgressRule(BaseModel, frozen=True):
    """One destination a function inside a VPC may reach."""

    model_config = _MODEL_CONFIG

    cidr: _Cidr = Field(description="Destination network, e.g. 10.0.0.0/8; stored in normal form.")
    ports: _PortList = Field(default=[], description="Destination ports (1-65535); empty means every port.")
    protocol: Literal["tcp", "udp", "any"] = Field(default="tcp", description="Transport protocol: tcp, udp or any.")


class VpcConfig(BaseModel, frozen=True):
    """Network placement of the function and its outbound (egress) policy."""

    model_config = _MODEL_CONFIG

    security_groups: _NetworkIdList = Field(default=[], description="Security groups attached to the function.")
    subnets: _NetworkIdList = Field(default=[], description="Subnets the function's instances are placed in.")
    egress: list[EgressRule] | None = Field(
        default=None,
        description="Allowed outbound destinations. Absent: outbound traffic is unrestricted (through NAT); "
        "a list: only these destinations are reachable.",
    )


class RoleConfig(BaseModel, frozen=True):
    """What the function may read from the platform."""

    model_config = _MODEL_CONFIG

    secrets: _SecretList = Field(default=[], description="Names of the secrets the function may read.")


class AsyncConfig(BaseModel, frozen=True):
    """How asynchronous (event) invocations are retried and where their results go."""

    model_config = _MODEL_CONFIG

    max_retries: _MaxRetries = Field(
        default=ASYNC_MAX_RETRIES, description=f"Retries after a failed event invocation (0-{ASYNC_MAX_RETRIES})."
    )
    max_event_age: _MaxEventAgeS = Field(
        default=ASYNC_MAX_EVENT_AGE_MAX_S,
        description=f"Seconds an event may wait before it is dropped "
        f"({ASYNC_MAX_EVENT_AGE_MIN_S}-{ASYNC_MAX_EVENT_AGE_MAX_S}).",
    )
    on_success: _SuccessDestination | None = Field(
        default=None, description="Where successful results go: function:<function-name>."
    )
    on_failure: _FailureDestination | None = Field(
        default=None,
        description="Where events go once retries are exhausted: function:<function-name>, or dlq (this "
        "function's dead-letter list).",
    )


class FunctionConfig(BaseModel, frozen=True):
    """The settings of one function: everything under `function:` in `hexabase.yaml`."""

    model_config = _MODEL_CONFIG

    name: _Name = Field(
        description=f"Function name: lowercase letters, digits and '-', at most {NAME_MAX_CHARS} characters."
    )
    runtime: _Runtime = Field(
        default=DEFAULT_RUNTIME, description="Language runtime, e.g. python3.11, nodejs20.x, go1.x, java17, provided."
    )
    handler: _Handler = Field(
        default=DEFAULT_HANDLER,
        description="Entry point. For Python, module.function, e.g. index.handler or src/app.main.",
    )
    description: _Description = Field(default="", description="Free text shown in listings.")
    memory: _MemoryMB = Field(
        default=MEMORY_MIN_MB,
        description=f"Memory in MB ({MEMORY_MIN_MB}-{MEMORY_MAX_MB}; at least {MANAGED_RUNTIME_MEMORY_MIN_MB} "
        f"for java and dotnet, which default to it). CPU scales with memory.",
    )
    timeout: _TimeoutS = Field(
        default=3, description=f"Seconds an invocation may run ({TIMEOUT_MIN_S}-{TIMEOUT_MAX_S})."
    )
    ephemeral_storage: _EphemeralStorageMB = Field(
        default=EPHEMERAL_STORAGE_MIN_MB,
        description=f"Size of /tmp in MB ({EPHEMERAL_STORAGE_MIN_MB}-{EPHEMERAL_STORAGE_MAX_MB}).",
    )
    environment: Annotated[dict[_EnvName, _EnvValue], _NULL_IS_EMPTY_DICT] = Field(
        default={},
        description=f"Environment variables; at most {ENVIRONMENT_MAX_BYTES} bytes of names and values in total.",
    )
    layers: Annotated[
        list[_Layer],
        Field(max_length=MAX_LAYERS),
        BeforeValidator(_check_layer_count),
        _NULL_IS_EMPTY_LIST,
    ] = Field(default=[], description=f"Layers unpacked under /opt, as name or name:version (at most {MAX_LAYERS}).")
    reserved_concurrency: _Count | None = Field(
        default=None,
        description="Concurrent executions reserved for (and capping) this function; 0 means always throttled.",
    )
    provisioned_concurrency: _ProvisionedConcurrency = Field(
        default=0,
        description="Warm instances kept ready: a number, or per plan as {single, team, enterprise}.",
    )
    vpc: VpcConfig | None = Field(default=None, description="Network placement and egress policy.")
    role: RoleConfig | None = Field(default=None, description="What the function may read (secrets).")
    async_: AsyncConfig = Field(
        default=AsyncConfig(),  # frozen, so one shared default instance is safe
        alias="async",
        description="Retries, maximum event age and destinations of asynchronous invocations.",
    )
    log_level: _LogLevel = Field(default="INFO", description="Log level: DEBUG, INFO, WARN or ERROR (any case).")
    concurrency_per_instance: _ConcurrencyPerInstance = Field(
        default=1,
        description=f"Invocations one instance serves at once (1-{CONCURRENCY_PER_INSTANCE_MAX}); above 1 "
        "only for async handlers.",
    )

    @model_validator(mode="before")
    @classmethod
    def _managed_runtime_memory_default(cls, data: object) -> object:
        # java and dotnet cannot run in the general default of 128 MB, so when memory is not given
        # they default to their own minimum instead of failing on a value the user never wrote.
        if isinstance(data, Mapping) and "memory" not in data:
            runtime = data.get("runtime")
            if isinstance(runtime, str) and minimum_memory_mb(runtime) > MEMORY_MIN_MB:
                return {**data, "memory": minimum_memory_mb(runtime)}
        return data

    @field_validator("handler")
    @classmethod
    def _python_handler_form(cls, handler: str, info: ValidationInfo) -> str:
        runtime = info.data.get("runtime")  # absent when the runtime itself failed validation
        if isinstance(runtime, str) and is_python_runtime(runtime) and not _is_python_handler(handler):
            raise _rule(
                "must look like module.function for Python runtimes, e.g. index.handler, src/app.main "
                "or pkg.mod.handler"
            )
        return handler

    @field_validator("memory")
    @classmethod
    def _runtime_memory_minimum(cls, memory_mb: int, info: ValidationInfo) -> int:
        runtime = info.data.get("runtime")
        if isinstance(runtime, str) and memory_mb < minimum_memory_mb(runtime):
            raise _rule(f"must be between {minimum_memory_mb(runtime)} and {MEMORY_MAX_MB} MB for {runtime}")
        return memory_mb

    @field_validator("environment")
    @classmethod
    def _environment_size(cls, environment: dict[str, str]) -> dict[str, str]:
        return _check_environment_size(environment)

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[str]) -> list[str]:
        return _check_layer_duplicates(layers)

    def environment_size_bytes(self) -> int:
        """UTF-8 bytes of all environment names and values, as counted against the 4 KB limit."""
        return _environment_size_bytes(self.environment)

    def provisioned_for_plan(self, plan: str) -> int:
        """Warm instances to keep for a workspace on `plan` (`single_user` is read as `single`).

        Raises:
            ValueError: `plan` is not one of `PLANS`.
        """
        plan = "single" if plan == "single_user" else plan
        if plan not in PLANS:
            raise ValueError(f"unknown plan {plan!r}: expected one of {', '.join(PLANS)}")
        provisioned = self.provisioned_concurrency
        if isinstance(provisioned, int):
            return provisioned
        return {"single": provisioned.single, "team": provisioned.team, "enterprise": provisioned.enterprise}[plan]


class FunctionFile(BaseModel, frozen=True):
    """A whole `hexabase.yaml` document."""

    model_config = _MODEL_CONFIG

    function: FunctionConfig = Field(description="The function's settings.")


def _is_python_handler(handler: str) -> bool:
    module, _, function = handler.rpartition(".")
    if not module or not function.isidentifier():
        return False
    segments = module.split("/")
    # No absolute paths or `..`: the module is looked up inside the function's own code directory.
    if any(segment in {"", ".", ".."} for segment in segments):
        return False
    return all(segments[-1].split("."))


# --- parsing and error rendering ---------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (plain YAML keeps the
    last one silently, so a second `memory:` would quietly win) and refuses aliases: a
    few hundred bytes of nested `*alias` references expand to gigabytes ("billion laughs")."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in hexabase.yaml", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_function_file(text: str, *, source: str = "hexabase.yaml") -> FunctionConfig:
    """Parse and validate the text of a `hexabase.yaml`.

    Raises:
        SpecError: the YAML is malformed or the configuration is invalid; one problem line per mistake.
    """
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        # from None: the YAML error's own text is already in the problem line.
        raise _spec_error(source, [_yaml_problem(exc)]) from None
    if document is None:
        raise _spec_error(source, ["the file is empty: expected a top-level 'function:' with the function's settings"])
    if not isinstance(document, dict):
        raise _spec_error(
            source,
            [f"the document must be a mapping with a top-level 'function:' key (got {_shown(document)})"],
        )
    try:
        return FunctionFile.model_validate(document).function
    except ValidationError as exc:
        # from None on purpose: pydantic's own rendering (with its URLs) is what the problems replace.
        raise _spec_error(source, _problems(exc, FunctionFile)) from None


def load_function_file(path: Path) -> FunctionConfig:
    """Read and validate a `hexabase.yaml` file; problems name the file.

    Raises:
        SpecError: the file is missing, unreadable, not UTF-8 or not a valid configuration.
    """
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _spec_error(source, ["file not found"]) from None
    except OSError as exc:
        raise _spec_error(source, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    try:
        # utf-8-sig drops the byte-order mark some Windows editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _spec_error(source, [f"not UTF-8 text (invalid byte at offset {exc.start}): save it as UTF-8"]) from None
    return parse_function_file(text, source=source)


def parse_function_config(data: Mapping[str, object], *, source: str) -> FunctionConfig:
    """Validate the fields of `function:` given as an already parsed mapping (e.g. a JSON request body).

    Raises:
        SpecError: the configuration is invalid; problem paths start at the field, e.g. `memory`.
    """
    given: object = data
    if not isinstance(given, Mapping):
        raise _spec_error(source, [f"expected a mapping of function settings (got {_shown(given)})"])
    try:
        return FunctionConfig.model_validate(dict(given))
    except ValidationError as exc:
        raise _spec_error(source, _problems(exc, FunctionConfig)) from None


def apply_config_patch(
    config: FunctionConfig, patch: Mapping[str, object], *, source: str = "request"
) -> FunctionConfig:
    """A new validated config with the top-level fields in `patch` replaced (not merged into).

    Raises:
        SpecError: the result is invalid, or the patch tries to rename the function.
    """
    if "name" in patch and patch["name"] != config.name:
        raise _spec_error(
            source,
            [f"name: cannot be changed; create a new function instead (got {_shown(patch['name'])})"],
        )
    merged: dict[str, object] = config.model_dump(mode="json", by_alias=True)
    merged.update(patch)
    return parse_function_config(merged, source=source)


def function_file_json_schema() -> dict[str, object]:
    """JSON Schema (draft 2020-12) of a whole `hexabase.yaml`, for editors and `hxb` tooling."""
    schema = FunctionFile.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": _SCHEMA_DIALECT, **schema, "title": "hexabase.yaml"}


def _spec_error(source: str, problems: list[str]) -> SpecError:
    lines = tuple(f"{source}: {problem}" for problem in problems)
    return SpecError("\n".join(lines), source=source, problems=lines)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        # yaml counts from 0; editors count from 1.
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {exc.problem or exc}"
    return f"invalid YAML: {exc}"


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _SHOWN_VALUE_MAX_CHARS
_REPR.maxother = _SHOWN_VALUE_MAX_CHARS


def _shown(value: object) -> str:
    # YAML and JSON spellings for the scalars users typed, Python's repr for the rest.
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value[: _SHOWN_VALUE_MAX_CHARS + 1])
    else:
        # reprlib bounds the work: a hostile value (a huge nested list) is never rendered whole.
        text = _REPR.repr(value)
    if len(text) > _SHOWN_VALUE_MAX_CHARS:
        text = text[: _SHOWN_VALUE_MAX_CHARS - 3] + "..."
    return text


def _problems(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = _user_loc(error["loc"])
        path = _render_path(loc)
        problem = f"{path}: {_rule_text(error, loc, root)}" if path else _rule_text(error, loc, root)
        if problem not in problems:  # unions can report one mistake twice
            problems.append(problem)
    return problems


def _user_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """The location as the user wrote it: without union tags and pydantic's dict-key marker."""
    cleaned: list[int | str] = []
    for index, part in enumerate(loc):
        if part == "[key]" and index == len(loc) - 1:
            continue
        if part in {_COUNT_TAG, _PER_PLAN_TAG} and cleaned[-1:] == ["provisioned_concurrency"]:
            continue
        cleaned.append(part)
    return tuple(cleaned)


def _render_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


# Plain words for pydantic's built-in error types, for the few checks our own validators do not own.
_BUILTIN_RULES: Final = {
    "missing": "required field missing",
    "model_type": "must be a mapping of settings",
    "model_attributes_type": "must be a mapping of settings",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "bool_type": "must be true or false",
}


def _rule_text(error: ErrorDetails, loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_field_text(loc, root)
    if kind == "missing":
        if loc == ("function",):
            return "required field missing: the function's settings go under a top-level 'function:' key"
        return "required field missing"
    if kind == _RULE_NO_INPUT:
        return error["msg"]
    if kind == _RULE:
        rule = error["msg"]
    elif kind == "literal_error":
        rule = f"must be one of {error.get('ctx', {}).get('expected', '')}"
    elif kind == "value_error":
        rule = str(error.get("ctx", {}).get("error", error["msg"]))
    else:
        rule = _BUILTIN_RULES.get(kind, error["msg"])
    return f"{rule} (got {_shown(error['input'])})"


# Which model a mapping at a location is, keyed by the last field name on the way there.
_MODEL_AT_FIELD: Final[dict[str, type[BaseModel]]] = {
    "function": FunctionConfig,
    "provisioned_concurrency": ProvisionedByPlan,
    "vpc": VpcConfig,
    "egress": EgressRule,
    "role": RoleConfig,
    "async": AsyncConfig,
}


def _unknown_field_text(loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    parent_names = [part for part in loc[:-1] if isinstance(part, str)]
    model = _MODEL_AT_FIELD.get(parent_names[-1], root) if parent_names else root
    known = _field_names(model)
    wrong = loc[-1] if loc else ""
    if isinstance(wrong, str) and (close := difflib.get_close_matches(wrong, known, n=1)):
        return f"unknown field, did you mean {close[0]!r}?"
    return f"unknown field (known fields: {', '.join(known)})"


def _field_names(model: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, field in model.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            names.extend(choice for choice in field.validation_alias.choices if isinstance(choice, str))
        else:
            names.append(field.alias or name)
    return names
