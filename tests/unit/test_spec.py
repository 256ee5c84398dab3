"""Tests of `hxb.spec`: the `hexabase.yaml` models, their error messages and the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hxb.errors import SpecError
from hxb.spec import (
    DEFAULT_HANDLER,
    DEFAULT_RUNTIME,
    ENVIRONMENT_MAX_BYTES,
    EPHEMERAL_STORAGE_MAX_MB,
    EPHEMERAL_STORAGE_MIN_MB,
    MAX_LAYERS,
    MEMORY_MAX_MB,
    MEMORY_MIN_MB,
    PLANS,
    TIMEOUT_MAX_S,
    TIMEOUT_MIN_S,
    AsyncConfig,
    EgressRule,
    FunctionConfig,
    ProvisionedByPlan,
    apply_config_patch,
    function_file_json_schema,
    is_python_runtime,
    load_function_file,
    parse_function_config,
    parse_function_file,
)

SEED_PROVISIONED = """\
# hexabase.yaml
function:
  name: critical-api
  provisioned_concurrency:
    single_user: 0 # Not available
    team: 2 # 2 warm instances
    enterprise: 10 # 10 warm instances
"""

SEED_RESERVED = """\
# Prevent throttling
function:
  name: batch-processor
  reserved_concurrency: 50 # Max 50 concurrent executions
"""

SEED_VPC = """\
# VPC configuration
function:
  name: secure-function
  vpc:
    security_groups:
      - sg-12345678
    subnets:
      - subnet-12345678
      - subnet-87654321
"""

FULL_DOCUMENT = """\
function:
  name: orders-api
  runtime: python3.12
  handler: src/app.main
  description: Takes orders
  memory: 1024
  timeout: 30
  ephemeral_storage: 2048
  environment:
    TABLE: orders
    PORT: 8080
    RATIO: 0.5
    DEBUG: true
  layers:
    - common
    - pandas:3
  reserved_concurrency: 20
  provisioned_concurrency: 2
  vpc:
    security_groups: [sg-1]
    subnets: [subnet-1, subnet-2]
    egress:
      - cidr: 10.1.2.3/8
        ports: [5432, 6379]
        protocol: tcp
      - cidr: 2001:db8::/32
        protocol: any
  role:
    secrets: [prod/db-password, api_key]
  async:
    max_retries: 1
    max_event_age: 3600
    on_success: function:audit-log
    on_failure: dlq
  log_level: debug
  concurrency_per_instance: 10
"""


def problems_of(text: str, source: str = "hexabase.yaml") -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        parse_function_file(text, source=source)
    error = caught.value
    assert str(error) == "\n".join(error.problems)
    assert error.source == source
    return error.problems


def document(**fields: Any) -> str:
    """A hexabase.yaml with `name: demo` and `fields`; a field given as `None`... is written as YAML null."""
    return yaml.safe_dump({"function": {"name": "demo", **fields}})


# --- the seed's snippets ---------------------------------------------------------------------------


def test_seed_provisioned_concurrency_snippet_loads_per_plan() -> None:
    config = parse_function_file(SEED_PROVISIONED)

    assert config.name == "critical-api"
    assert config.provisioned_concurrency == ProvisionedByPlan(single=0, team=2, enterprise=10)
    assert [config.provisioned_for_plan(plan) for plan in PLANS] == [0, 2, 10]


def test_seed_reserved_concurrency_snippet_loads() -> None:
    config = parse_function_file(SEED_RESERVED)

    assert config.name == "batch-processor"
    assert config.reserved_concurrency == 50


def test_seed_vpc_snippet_loads_with_unrestricted_egress() -> None:
    config = parse_function_file(SEED_VPC)

    assert config.name == "secure-function"
    assert config.vpc is not None
    assert config.vpc.security_groups == ["sg-12345678"]
    assert config.vpc.subnets == ["subnet-12345678", "subnet-87654321"]
    assert config.vpc.egress is None


# --- valid documents -------------------------------------------------------------------------------


def test_defaults_apply_when_only_name_is_given() -> None:
    config = parse_function_file("function:\n  name: demo\n")

    assert config.runtime == DEFAULT_RUNTIME == "python3.11"
    assert config.handler == DEFAULT_HANDLER == "index.handler"
    assert config.description == ""
    assert config.memory == MEMORY_MIN_MB == 128
    assert config.timeout == 3
    assert config.ephemeral_storage == EPHEMERAL_STORAGE_MIN_MB == 512
    assert config.environment == {}
    assert config.layers == []
    assert config.reserved_concurrency is None
    assert config.provisioned_concurrency == 0
    assert config.vpc is None
    assert config.role is None
    assert config.async_ == AsyncConfig(max_retries=2, max_event_age=21600, on_success=None, on_failure=None)
    assert config.log_level == "INFO"
    assert config.concurrency_per_instance == 1


def test_full_document_loads_every_field() -> None:
    config = parse_function_file(FULL_DOCUMENT)

    assert config.runtime == "python3.12"
    assert config.handler == "src/app.main"
    assert config.description == "Takes orders"
    assert (config.memory, config.timeout, config.ephemeral_storage) == (1024, 30, 2048)
    assert config.environment == {"TABLE": "orders", "PORT": "8080", "RATIO": "0.5", "DEBUG": "true"}
    assert config.layers == ["common", "pandas:3"]
    assert config.reserved_concurrency == 20
    assert config.provisioned_concurrency == 2
    assert config.vpc is not None
    assert config.vpc.egress == [
        EgressRule(cidr="10.0.0.0/8", ports=[5432, 6379], protocol="tcp"),
        EgressRule(cidr="2001:db8::/32", ports=[], protocol="any"),
    ]
    assert config.role is not None
    assert config.role.secrets == ["prod/db-password", "api_key"]
    assert config.async_ == AsyncConfig(
        max_retries=1, max_event_age=3600, on_success="function:audit-log", on_failure="dlq"
    )
    assert config.log_level == "DEBUG"
    assert config.concurrency_per_instance == 10


@pytest.mark.parametrize(
    ("fields", "attribute", "expected"),
    [
        pytest.param({"name": "a"}, "name", "a", id="name-one-char"),
        pytest.param({"name": "a" * 64}, "name", "a" * 64, id="name-64-chars"),
        pytest.param({"name": "9-lives"}, "name", "9-lives", id="name-leading-digit"),
        pytest.param({"runtime": "python3.7"}, "runtime", "python3.7", id="runtime-python37"),
        pytest.param({"runtime": "python3.13"}, "runtime", "python3.13", id="runtime-python313"),
        pytest.param({"runtime": "nodejs20.x", "handler": "index.handler"}, "runtime", "nodejs20.x", id="nodejs"),
        pytest.param({"runtime": "go1.x", "handler": "bootstrap"}, "handler", "bootstrap", id="go-plain-handler"),
        pytest.param({"runtime": "ruby3.2"}, "runtime", "ruby3.2", id="runtime-ruby"),
        pytest.param({"runtime": "dotnet8"}, "runtime", "dotnet8", id="runtime-dotnet"),
        pytest.param({"runtime": "dotnet6.0"}, "runtime", "dotnet6.0", id="runtime-dotnet-dot-zero"),
        pytest.param({"runtime": "provided"}, "runtime", "provided", id="runtime-provided"),
        pytest.param({"runtime": "provided.al2"}, "runtime", "provided.al2", id="runtime-provided-al2"),
        pytest.param({"runtime": "provided.al2023"}, "runtime", "provided.al2023", id="runtime-provided-al2023"),
        pytest.param({"handler": "pkg.mod.handler"}, "handler", "pkg.mod.handler", id="handler-dotted"),
        pytest.param({"handler": "src/app.main"}, "handler", "src/app.main", id="handler-path"),
        pytest.param({"memory": MEMORY_MAX_MB}, "memory", MEMORY_MAX_MB, id="memory-max"),
        pytest.param({"runtime": "java17", "memory": 512}, "memory", 512, id="java-512"),
        pytest.param({"runtime": "java17"}, "memory", 512, id="java-default-memory"),
        pytest.param({"runtime": "dotnet8"}, "memory", 512, id="dotnet-default-memory"),
        pytest.param({"timeout": TIMEOUT_MIN_S}, "timeout", TIMEOUT_MIN_S, id="timeout-min"),
        pytest.param({"timeout": TIMEOUT_MAX_S}, "timeout", TIMEOUT_MAX_S, id="timeout-max"),
        pytest.param({"ephemeral_storage": EPHEMERAL_STORAGE_MAX_MB}, "ephemeral_storage", 10240, id="tmp-max"),
        pytest.param({"environment": {"TZ": "UTC"}}, "environment", {"TZ": "UTC"}, id="env-tz-allowed"),
        pytest.param({"environment": {"_private": "x"}}, "environment", {"_private": "x"}, id="env-underscore"),
        pytest.param({"environment": {"N": 1.5e3}}, "environment", {"N": "1500.0"}, id="env-float"),
        pytest.param({"environment": {"OFF": False}}, "environment", {"OFF": "false"}, id="env-false"),
        pytest.param({"environment": None}, "environment", {}, id="env-null-is-empty"),
        pytest.param({"layers": None}, "layers", [], id="layers-null-is-empty"),
        pytest.param({"layers": ["a", "b", "c", "d", "e"]}, "layers", ["a", "b", "c", "d", "e"], id="five-layers"),
        pytest.param({"reserved_concurrency": 0}, "reserved_concurrency", 0, id="reserved-zero"),
        pytest.param({"log_level": "Warning"}, "log_level", "WARN", id="log-level-warning"),
        pytest.param({"log_level": "error"}, "log_level", "ERROR", id="log-level-lowercase"),
        pytest.param({"concurrency_per_instance": 1000}, "concurrency_per_instance", 1000, id="per-instance-max"),
    ],
)
def test_valid_value_is_accepted_when_in_range(fields: dict[str, Any], attribute: str, expected: object) -> None:
    config = parse_function_file(document(**fields))

    assert getattr(config, attribute) == expected


def test_egress_cidr_is_normalised_when_host_bits_are_set() -> None:
    config = parse_function_file(document(vpc={"egress": [{"cidr": "192.168.7.9/16"}, {"cidr": "10.0.0.1"}]}))

    assert config.vpc is not None
    assert config.vpc.egress is not None
    assert [rule.cidr for rule in config.vpc.egress] == ["192.168.0.0/16", "10.0.0.1/32"]


def test_empty_egress_list_means_no_destination_when_given() -> None:
    config = parse_function_file(document(vpc={"egress": []}))

    assert config.vpc is not None
    assert config.vpc.egress == []


def test_environment_size_counts_utf8_bytes_of_names_and_values() -> None:
    config = parse_function_file(document(environment={"A": "é", "BC": "1"}))

    assert config.environment_size_bytes() == 1 + 2 + 2 + 1


def test_environment_at_exactly_4096_bytes_is_accepted() -> None:
    config = parse_function_file(document(environment={"K": "x" * (ENVIRONMENT_MAX_BYTES - 1)}))

    assert config.environment_size_bytes() == ENVIRONMENT_MAX_BYTES


# --- invalid fields --------------------------------------------------------------------------------

INVALID_CASES = [
    # name
    pytest.param({"name": "Orders"}, "function.name", "lowercase letters, digits and '-'", id="name-uppercase"),
    pytest.param({"name": "my_fn"}, "function.name", "lowercase letters", id="name-underscore"),
    pytest.param({"name": "-fn"}, "function.name", "starting and ending with a letter or digit", id="name-lead-dash"),
    pytest.param({"name": "fn-"}, "function.name", "starting and ending with a letter or digit", id="name-trail-dash"),
    pytest.param({"name": "a" * 65}, "function.name", "1 to 64", id="name-too-long"),
    pytest.param({"name": ""}, "function.name", "1 to 64", id="name-empty"),
    pytest.param({"name": 42}, "function.name", "(got 42)", id="name-not-string"),
    # runtime
    pytest.param({"runtime": "python3.6"}, "function.runtime", "must be a runtime such as", id="runtime-python36"),
    pytest.param({"runtime": "python2.7"}, "function.runtime", "must be a runtime such as", id="runtime-python2"),
    pytest.param({"runtime": "nodejs20"}, "function.runtime", "must be a runtime such as", id="runtime-node-no-x"),
    pytest.param({"runtime": "cobol"}, "function.runtime", "(got 'cobol')", id="runtime-unknown-form"),
    pytest.param({"runtime": "provided.al3"}, "function.runtime", "must be a runtime", id="runtime-provided-al3"),
    # handler
    pytest.param({"handler": "index"}, "function.handler", "must look like module.function", id="handler-no-dot"),
    pytest.param({"handler": "index."}, "function.handler", "must look like module.function", id="handler-no-func"),
    pytest.param({"handler": ".handler"}, "function.handler", "module.function", id="handler-no-module"),
    pytest.param({"handler": "../x.handler"}, "function.handler", "module.function", id="handler-parent-dir"),
    pytest.param({"handler": "my app.main"}, "function.handler", "without spaces", id="handler-whitespace"),
    pytest.param({"handler": ""}, "function.handler", "1 to 128 characters", id="handler-empty"),
    pytest.param({"handler": "a." + "b" * 127}, "function.handler", "1 to 128 characters", id="handler-too-long"),
    # description
    pytest.param({"description": "x" * 257}, "function.description", "at most 256 characters", id="description-long"),
    # memory
    pytest.param({"memory": 127}, "function.memory", "between 128 and 10240 MB (got 127)", id="memory-low"),
    pytest.param({"memory": 10241}, "function.memory", "between 128 and 10240 MB (got 10241)", id="memory-high"),
    pytest.param({"memory": "256"}, "function.memory", "must be a whole number", id="memory-string"),
    pytest.param({"memory": 256.5}, "function.memory", "must be a whole number", id="memory-float"),
    pytest.param({"memory": True}, "function.memory", "whole number between 128 and 10240 MB (got true)", id="bool"),
    pytest.param(
        {"runtime": "java17", "memory": 256},
        "function.memory",
        "must be between 512 and 10240 MB for java17 (got 256)",
        id="java-256",
    ),
    pytest.param({"runtime": "dotnet8", "memory": 128}, "function.memory", "512 and 10240 MB", id="dotnet-128"),
    # timeout
    pytest.param({"timeout": 0}, "function.timeout", "between 1 and 900 seconds (got 0)", id="timeout-zero"),
    pytest.param({"timeout": 901}, "function.timeout", "between 1 and 900 seconds (got 901)", id="timeout-high"),
    # ephemeral storage
    pytest.param({"ephemeral_storage": 511}, "function.ephemeral_storage", "between 512 and 10240 MB", id="tmp-low"),
    pytest.param({"ephemeral_storage": 10241}, "function.ephemeral_storage", "512 and 10240 MB", id="tmp-high"),
    # environment
    pytest.param({"environment": ["A=1"]}, "function.environment", "must be a mapping", id="env-list"),
    pytest.param({"environment": {"1ABC": "x"}}, "function.environment.1ABC", "not a valid variable name", id="env-d"),
    pytest.param({"environment": {"MY-VAR": "x"}}, "function.environment.MY-VAR", "variable name", id="env-dash"),
    pytest.param({"environment": {"HXB_MODE": "x"}}, "function.environment.HXB_MODE", "reserved", id="env-hxb"),
    pytest.param({"environment": {"AWS_REGION": "x"}}, "function.environment.AWS_REGION", "reserved", id="env-aws"),
    pytest.param({"environment": {"_HANDLER": "x"}}, "function.environment._HANDLER", "reserved", id="env-handler"),
    pytest.param(
        {"environment": {"_X_AMZN_TRACE_ID": "x"}}, "function.environment._X_AMZN_TRACE_ID", "reserved", id="env-trace"
    ),
    pytest.param(
        {"environment": {"LAMBDA_TASK_ROOT": "x"}}, "function.environment.LAMBDA_TASK_ROOT", "reserved", id="env-root"
    ),
    pytest.param(
        {"environment": {"LAMBDA_RUNTIME_DIR": "x"}}, "function.environment.LAMBDA_RUNTIME_DIR", "reserved", id="env-rt"
    ),
    pytest.param({"environment": {"A": None}}, "function.environment.A", "string, number or boolean", id="env-null"),
    pytest.param({"environment": {"A": [1]}}, "function.environment.A", "string, number or boolean", id="env-list-v"),
    pytest.param({"environment": {"A": {"b": 1}}}, "function.environment.A", "string, number", id="env-dict-value"),
    pytest.param(
        {"environment": {"BIG": "x" * 4997}},
        "function.environment",
        "total size is 5000 bytes, over the 4096-byte (4 KB) limit",
        id="env-over-4kb",
    ),
    # layers
    pytest.param({"layers": list("abcdef")}, "function.layers", "at most 5 layers are allowed (got 6)", id="layers-6"),
    pytest.param({"layers": ["a", "b:1", "a"]}, "function.layers", "'a' is listed more than once", id="layers-dup"),
    pytest.param({"layers": ["a:1", "a:2"]}, "function.layers", "listed more than once", id="layers-dup-version"),
    pytest.param({"layers": ["ok", "bad layer"]}, "function.layers[1]", "layer name", id="layers-bad-name"),
    pytest.param({"layers": ["a:b"]}, "function.layers[0]", "optionally ':<version>'", id="layers-bad-version"),
    pytest.param({"layers": "common"}, "function.layers", "must be a list", id="layers-not-list"),
    # concurrency
    pytest.param({"reserved_concurrency": -1}, "function.reserved_concurrency", "0 or more (got -1)", id="reserved"),
    pytest.param({"reserved_concurrency": "x"}, "function.reserved_concurrency", "whole number", id="reserved-str"),
    pytest.param({"provisioned_concurrency": -1}, "function.provisioned_concurrency", "0 or more", id="prov-neg"),
    pytest.param(
        {"provisioned_concurrency": "lots"},
        "function.provisioned_concurrency",
        "or a mapping of plan (single, team, enterprise)",
        id="prov-string",
    ),
    pytest.param(
        {"provisioned_concurrency": {"team": -1}}, "function.provisioned_concurrency.team", "0 or more", id="prov-team"
    ),
    pytest.param(
        {"provisioned_concurrency": {"free": 1}},
        "function.provisioned_concurrency.free",
        "unknown field (known fields: single, single_user, team, enterprise)",
        id="prov-unknown-plan",
    ),
    pytest.param(
        {"provisioned_concurrency": {"single": 1, "single_user": 1}},
        "function.provisioned_concurrency",
        "either single or single_user",
        id="prov-both-single",
    ),
    pytest.param(
        {"concurrency_per_instance": 0}, "function.concurrency_per_instance", "between 1 and 1000", id="per-instance-0"
    ),
    pytest.param(
        {"concurrency_per_instance": 1001}, "function.concurrency_per_instance", "1 and 1000", id="per-instance-high"
    ),
    # vpc
    pytest.param({"vpc": "on"}, "function.vpc", "must be a mapping", id="vpc-not-mapping"),
    pytest.param({"vpc": {"subnets": ["a b"]}}, "function.vpc.subnets[0]", "without spaces", id="vpc-subnet-space"),
    pytest.param(
        {"vpc": {"egress": [{"cidr": "10.0.0.300/8"}]}}, "function.vpc.egress[0].cidr", "IPv4 or IPv6", id="cidr-bad"
    ),
    pytest.param({"vpc": {"egress": [{"cidr": "example.com"}]}}, "function.vpc.egress[0].cidr", "network", id="cidr"),
    pytest.param({"vpc": {"egress": [{"ports": [443]}]}}, "function.vpc.egress[0].cidr", "required", id="cidr-miss"),
    pytest.param(
        {"vpc": {"egress": [{"cidr": "10.0.0.0/8", "ports": [0]}]}},
        "function.vpc.egress[0].ports[0]",
        "between 1 and 65535 (got 0)",
        id="port-zero",
    ),
    pytest.param(
        {"vpc": {"egress": [{"cidr": "10.0.0.0/8", "ports": [80, 65536]}]}},
        "function.vpc.egress[0].ports[1]",
        "between 1 and 65535 (got 65536)",
        id="port-high",
    ),
    pytest.param(
        {"vpc": {"egress": [{"cidr": "10.0.0.0/8", "protocol": "icmp"}]}},
        "function.vpc.egress[0].protocol",
        "must be one of 'tcp', 'udp' or 'any' (got 'icmp')",
        id="protocol",
    ),
    # role
    pytest.param({"role": {"secrets": ["db password"]}}, "function.role.secrets[0]", "secret name", id="secret-space"),
    pytest.param({"role": {"secrets": "db"}}, "function.role.secrets", "must be a list", id="secrets-not-list"),
    # async
    pytest.param({"async": {"max_retries": 3}}, "function.async.max_retries", "between 0 and 2 (got 3)", id="retries"),
    pytest.param({"async": {"max_retries": -1}}, "function.async.max_retries", "between 0 and 2", id="retries-neg"),
    pytest.param(
        {"async": {"max_event_age": 59}}, "function.async.max_event_age", "between 60 and 21600 seconds", id="age-low"
    ),
    pytest.param({"async": {"max_event_age": 21601}}, "function.async.max_event_age", "60 and 21600", id="age-high"),
    pytest.param(
        {"async": {"on_success": "dlq"}},
        "function.async.on_success",
        "'dlq' is only a failure destination",
        id="dlq-on-success",
    ),
    pytest.param(
        {"async": {"on_success": "lambda:audit"}}, "function.async.on_success", "function:<function-name>", id="dest"
    ),
    pytest.param(
        {"async": {"on_failure": "function:Bad_Name"}},
        "function.async.on_failure",
        "function:<function-name> or dlq",
        id="dest-bad-name",
    ),
    pytest.param({"async": {"on_failure": "function:"}}, "function.async.on_failure", "or dlq", id="dest-empty-name"),
    # log level
    pytest.param(
        {"log_level": "verbose"},
        "function.log_level",
        "must be one of 'DEBUG', 'INFO', 'WARN' or 'ERROR'",
        id="log-level",
    ),
    pytest.param({"log_level": 3}, "function.log_level", "must be one of", id="log-level-number"),
    # unknown fields
    pytest.param({"colour": "blue"}, "function.colour", "unknown field (known fields: name, runtime,", id="unknown"),
    pytest.param({"memroy": 256}, "function.memroy", "unknown field, did you mean 'memory'?", id="unknown-typo"),
    pytest.param({"async_": {}}, "function.async_", "did you mean 'async'?", id="python-name-of-async"),
    pytest.param({"vpc": {"colour": 1}}, "function.vpc.colour", "unknown field (known fields: security_", id="nested"),
    pytest.param(
        {"vpc": {"egress": [{"cidr": "10.0.0.0/8", "port": 80}]}},
        "function.vpc.egress[0].port",
        "did you mean 'ports'?",
        id="nested-in-list",
    ),
    pytest.param({"async": {"retries": 1}}, "function.async.retries", "unknown field", id="nested-async"),
]


@pytest.mark.parametrize(("fields", "path", "words"), INVALID_CASES)
def test_invalid_field_is_reported_with_path_and_rule(fields: dict[str, Any], path: str, words: str) -> None:
    problems = problems_of(document(**fields))

    matching = [problem for problem in problems if problem.startswith(f"hexabase.yaml: {path}: ")]
    assert matching, problems
    assert words in matching[0]


@pytest.mark.parametrize(("fields", "path", "words"), INVALID_CASES)
def test_invalid_field_message_has_no_pydantic_jargon(fields: dict[str, Any], path: str, words: str) -> None:
    message = "\n".join(problems_of(document(**fields)))

    for jargon in ("pydantic", "For further information", "Input should", "Value error", "[key]", "<count>"):
        assert jargon not in message


def test_memory_below_minimum_reads_exactly_as_documented() -> None:
    assert problems_of(document(memory=64)) == (
        "hexabase.yaml: function.memory: must be between 128 and 10240 MB (got 64)",
    )


def test_environment_over_limit_reads_exactly_as_documented() -> None:
    problems = problems_of(document(environment={"BIG": "x" * 4997}))

    assert problems == (
        "hexabase.yaml: function.environment: total size is 5000 bytes, over the 4096-byte (4 KB) limit",
    )


def test_missing_name_is_reported_as_required_field() -> None:
    problems = problems_of("function:\n  memory: 256\n")

    assert problems == ("hexabase.yaml: function.name: required field missing",)


def test_unknown_top_level_field_is_reported_next_to_the_function_key() -> None:
    problems = problems_of("function:\n  name: demo\ncolour: blue\n")

    assert problems == ("hexabase.yaml: colour: unknown field (known fields: function)",)


def test_every_mistake_is_reported_when_there_are_several() -> None:
    problems = problems_of(document(memory=64, timeout=0, colour="blue"))

    assert [problem.split(": ")[1] for problem in problems] == [
        "function.memory",
        "function.timeout",
        "function.colour",
    ]


def test_long_value_is_shortened_in_the_message() -> None:
    (problem,) = problems_of(document(runtime="x" * 500))

    assert len(problem) < 250
    assert problem.endswith("...)")


def test_source_names_the_file_in_every_problem() -> None:
    problems = problems_of(document(memory=64, timeout=0), source="fns/orders/hexabase.yaml")

    assert all(problem.startswith("fns/orders/hexabase.yaml: function.") for problem in problems)


# --- document-level problems -----------------------------------------------------------------------


def test_yaml_syntax_error_names_line_and_column() -> None:
    problems = problems_of("function:\n  name: demo\n   bad: 1\n")

    assert len(problems) == 1
    assert problems[0].startswith("hexabase.yaml: line 3, column 7: invalid YAML: ")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_empty_file_is_reported_when_nothing_is_in_it(text: str) -> None:
    (problem,) = problems_of(text)

    assert problem.startswith("hexabase.yaml: the file is empty")
    assert "function:" in problem


@pytest.mark.parametrize(
    ("text", "shown"), [("- a\n- b\n", "['a', 'b']"), ("just text\n", "'just text'"), ("42\n", "42")]
)
def test_document_that_is_not_a_mapping_is_reported(text: str, shown: str) -> None:
    (problem,) = problems_of(text)

    assert problem == f"hexabase.yaml: the document must be a mapping with a top-level 'function:' key (got {shown})"


def test_missing_function_key_is_reported_with_a_hint() -> None:
    problems = problems_of("name: demo\n")

    assert problems[0] == (
        "hexabase.yaml: function: required field missing: the function's settings go under a top-level 'function:' key"
    )
    assert "hexabase.yaml: name: unknown field (known fields: function)" in problems


@pytest.mark.parametrize(("text", "shown"), [("function:\n", "null"), ("function: demo\n", "'demo'")])
def test_function_key_that_is_not_a_mapping_is_reported(text: str, shown: str) -> None:
    assert problems_of(text) == (f"hexabase.yaml: function: must be a mapping of settings (got {shown})",)


# --- serialisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [FULL_DOCUMENT, SEED_PROVISIONED, SEED_RESERVED, SEED_VPC])
def test_config_round_trips_through_json_dump(text: str) -> None:
    config = parse_function_file(text)

    dumped = json.loads(json.dumps(config.model_dump(mode="json", by_alias=True)))

    assert FunctionConfig.model_validate(dumped) == config
    assert "async" in dumped


def test_per_plan_provisioning_dumps_single_under_its_canonical_name() -> None:
    dumped = parse_function_file(SEED_PROVISIONED).model_dump(mode="json", by_alias=True)

    assert dumped["provisioned_concurrency"] == {"single": 0, "team": 2, "enterprise": 10}


@given(
    memory_mb=st.integers(min_value=MEMORY_MIN_MB, max_value=MEMORY_MAX_MB),
    timeout_s=st.integers(min_value=TIMEOUT_MIN_S, max_value=TIMEOUT_MAX_S),
)
def test_any_memory_and_timeout_in_range_validate_and_round_trip(memory_mb: int, timeout_s: int) -> None:
    config = parse_function_file(document(memory=memory_mb, timeout=timeout_s))

    assert (config.memory, config.timeout) == (memory_mb, timeout_s)
    assert FunctionConfig.model_validate(config.model_dump(mode="json", by_alias=True)) == config


def test_config_is_frozen_when_assigned() -> None:
    config = parse_function_file(SEED_RESERVED)

    with pytest.raises(ValueError, match="frozen"):
        config.memory = 256  # type: ignore[misc]


# --- parse_function_config and apply_config_patch ------------------------------------------------


def test_parse_function_config_paths_start_at_the_field() -> None:
    with pytest.raises(SpecError) as caught:
        parse_function_config({"name": "demo", "memory": 64, "vpc": {"subnets": [1]}}, source="request")

    assert caught.value.problems == (
        "request: memory: must be between 128 and 10240 MB (got 64)",
        "request: vpc.subnets[0]: must be an identifier of 1 to 255 characters without spaces (got 1)",
    )


def test_parse_function_config_accepts_the_inner_fields() -> None:
    config = parse_function_config({"name": "demo", "async": {"on_failure": "dlq"}}, source="request")

    assert config.async_.on_failure == "dlq"


def test_parse_function_config_reports_unknown_field_against_function_fields() -> None:
    with pytest.raises(SpecError) as caught:
        parse_function_config({"name": "demo", "function": {}}, source="request")

    assert caught.value.problems[0].startswith("request: function: unknown field (known fields: name, runtime,")


def test_apply_config_patch_replaces_top_level_fields() -> None:
    config = parse_function_file(FULL_DOCUMENT)

    patched = apply_config_patch(config, {"memory": 256, "environment": {"ONLY": 1}, "async": {"max_retries": 0}})

    assert (patched.memory, patched.environment) == (256, {"ONLY": "1"})
    assert patched.async_ == AsyncConfig(max_retries=0, max_event_age=21600, on_success=None, on_failure=None)
    assert patched.timeout == config.timeout
    assert config.memory == 1024  # the original is untouched


def test_apply_config_patch_refuses_invalid_value() -> None:
    config = parse_function_file(SEED_RESERVED)

    with pytest.raises(SpecError) as caught:
        apply_config_patch(config, {"timeout": 1000}, source="PATCH /v1/functions/batch-processor")

    assert caught.value.problems == (
        "PATCH /v1/functions/batch-processor: timeout: must be between 1 and 900 seconds (got 1000)",
    )


def test_apply_config_patch_refuses_name_change() -> None:
    config = parse_function_file(SEED_RESERVED)

    with pytest.raises(SpecError) as caught:
        apply_config_patch(config, {"name": "other"})

    (problem,) = caught.value.problems
    assert problem.startswith("request: name: cannot be changed")
    assert "(got 'other')" in problem


def test_apply_config_patch_accepts_unchanged_name() -> None:
    config = parse_function_file(SEED_RESERVED)

    assert apply_config_patch(config, {"name": "batch-processor"}) == config


def test_apply_config_patch_refuses_unknown_field() -> None:
    config = parse_function_file(SEED_RESERVED)

    with pytest.raises(SpecError, match="request: memroy: unknown field, did you mean 'memory'"):
        apply_config_patch(config, {"memroy": 256})


def test_apply_config_patch_rechecks_memory_when_runtime_changes() -> None:
    config = parse_function_file(SEED_RESERVED)

    with pytest.raises(SpecError, match="memory: must be between 512 and 10240 MB for java21"):
        apply_config_patch(config, {"runtime": "java21", "handler": "example.Handler::handleRequest"})


# --- provisioned_for_plan ------------------------------------------------------------------------


@pytest.mark.parametrize("plan", [*PLANS, "single_user"])
def test_provisioned_for_plan_returns_the_number_for_every_plan_when_an_integer(plan: str) -> None:
    config = parse_function_file(document(provisioned_concurrency=3))

    assert config.provisioned_for_plan(plan) == 3


def test_provisioned_for_plan_reads_single_user_as_single() -> None:
    config = parse_function_file(document(provisioned_concurrency={"single_user": 1, "team": 4}))

    assert config.provisioned_for_plan("single") == config.provisioned_for_plan("single_user") == 1
    assert config.provisioned_for_plan("team") == 4
    assert config.provisioned_for_plan("enterprise") == 0


def test_provisioned_for_plan_refuses_unknown_plan() -> None:
    config = parse_function_file(SEED_PROVISIONED)

    with pytest.raises(ValueError, match="unknown plan 'free'"):
        config.provisioned_for_plan("free")


# --- load_function_file --------------------------------------------------------------------------


def test_load_function_file_reads_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "hexabase.yaml"
    path.write_text("\ufeff" + SEED_VPC.replace("VPC", "VPC — ünïcode"), encoding="utf-8")

    assert load_function_file(path).name == "secure-function"


def test_load_function_file_names_the_path_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "hexabase.yaml"
    path.write_text(document(memory=64), encoding="utf-8")

    with pytest.raises(SpecError) as caught:
        load_function_file(path)

    assert caught.value.source == str(path)
    assert caught.value.problems == (f"{path}: function.memory: must be between 128 and 10240 MB (got 64)",)


def test_load_function_file_reports_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "hexabase.yaml"

    with pytest.raises(SpecError) as caught:
        load_function_file(path)

    assert caught.value.problems == (f"{path}: file not found",)


def test_load_function_file_reports_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "hexabase.yaml"
    path.write_bytes(b"function:\n  name: caf\xe9\n")

    with pytest.raises(SpecError) as caught:
        load_function_file(path)

    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: not UTF-8 text")


# --- JSON Schema and helpers ---------------------------------------------------------------------


def test_json_schema_is_draft_2020_12_with_the_function_property() -> None:
    schema = function_file_json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "hexabase.yaml"
    assert schema["additionalProperties"] is False
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert "function" in properties
    json.dumps(schema)  # plain JSON, ready to be written to a file


def test_json_schema_describes_every_property() -> None:
    schema = function_file_json_schema()
    definitions = schema["$defs"]
    assert isinstance(definitions, dict)

    objects = [schema, *definitions.values()]
    for definition in objects:
        for name, prop in definition["properties"].items():
            assert prop.get("description"), name
    function_properties = definitions["FunctionConfig"]["properties"]
    assert "async" in function_properties
    assert function_properties["memory"]["minimum"] == MEMORY_MIN_MB
    assert definitions["FunctionConfig"]["required"] == ["name"]


def test_json_schema_allows_the_single_user_spelling() -> None:
    definitions = function_file_json_schema()["$defs"]
    assert isinstance(definitions, dict)

    assert "single_user" in definitions["ProvisionedByPlan"]["properties"]


@pytest.mark.parametrize(
    ("runtime", "expected"), [("python3.11", True), ("python3.7", True), ("nodejs20.x", False), ("provided", False)]
)
def test_is_python_runtime_matches_python_runtimes(runtime: str, expected: bool) -> None:
    assert is_python_runtime(runtime) is expected


def test_spec_error_is_a_client_error_with_stable_type() -> None:
    with pytest.raises(SpecError) as caught:
        parse_function_file("")

    assert caught.value.error_type == "Client.InvalidFunctionConfig"
    assert caught.value.http_status == 400


def test_max_layers_constant_matches_the_enforced_limit() -> None:
    config = parse_function_file(document(layers=[f"layer-{index}" for index in range(MAX_LAYERS)]))

    assert len(config.layers) == MAX_LAYERS


def test_a_key_given_twice_is_refused_with_its_line() -> None:
    with pytest.raises(SpecError) as info:
        parse_function_file("function:\n  name: twice\n  memory: 256\n  memory: 512\n")
    assert "line 4" in str(info.value)
    assert "duplicate key 'memory'" in str(info.value)


def test_yaml_aliases_are_refused_before_they_can_expand() -> None:
    # Nested aliases ("billion laughs") would expand a few hundred bytes into gigabytes.
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
    )
    with pytest.raises(SpecError) as info:
        parse_function_file(laughs + "function:\n  name: boom\n  memory: *i\n")
    assert "aliases (*name) are not allowed" in str(info.value)
    assert "line 2" in str(info.value)


def test_a_huge_nested_value_is_shown_shortened() -> None:
    nested = "[" * 50 + "1" + "]" * 50
    with pytest.raises(SpecError) as info:
        parse_function_file(f"function:\n  name: deep\n  memory: {nested}\n")
    assert len(str(info.value)) < 300
