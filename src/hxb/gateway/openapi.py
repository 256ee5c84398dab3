"""The OpenAPI 3.1 document of the management API and the Invoke API, served at /openapi.json."""

from __future__ import annotations

import dataclasses
from typing import Any

from hxb import __version__
from hxb.queue.dispatcher import AsyncStatistics
from hxb.spec import FunctionConfig


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("Error"))}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[a-z0-9-]{1,64}$"}}
_ZIP_BODY = {
    "required": True,
    "description": "The function's zip package, with hexabase.yaml at its root (50 MB at most).",
    "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
}


_EVENT_ID = {"name": "event_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _async_schemas() -> dict[str, Any]:
    counter = {"type": "integer"}
    summary = {
        "event_id": {"type": "string"},
        "enqueued_at": {"type": "string", "format": "date-time"},
        "dead_at": {"type": ["string", "null"], "format": "date-time"},
        "attempts": counter,
        "reason": {"enum": ["RetriesExhausted", "EventAgeExceeded", None]},
        "error_type": {"type": ["string", "null"]},
        "payload_bytes": counter,
    }
    return {
        "AsyncSummary": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "workspace": {"type": "string"},
                "statistics": {
                    "type": "object",
                    "description": "Counters since the server started, and events running or waiting now.",
                    "properties": {f.name: {"type": "integer"} for f in dataclasses.fields(AsyncStatistics)},
                },
                "pending": counter,
                "dead_letters": counter,
            },
        },
        "DeadLetterSummary": {"type": "object", "properties": summary},
        "DeadLetter": {
            "type": "object",
            "properties": {
                **summary,
                "invoked_arn": {"type": "string"},
                "payload": {"description": "The event, as the caller sent it"},
                "error": {"description": "The last attempt's error document"},
            },
        },
    }


def _async_paths() -> dict[str, Any]:
    return {
        "/v1/functions/{name}/async": {
            "parameters": [_NAME],
            "get": {
                "summary": "A function's asynchronous events: counters, pending and dead-lettered",
                "responses": {
                    "200": {"description": "OK", "content": _json(_ref("AsyncSummary"))},
                    "404": _error("No such function"),
                },
            },
        },
        "/v1/functions/{name}/dlq": {
            "parameters": [_NAME],
            "get": {
                "summary": "List a function's dead-lettered events, oldest first",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}}],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": _json(
                            {
                                "type": "object",
                                "properties": {"dead_letters": {"type": "array", "items": _ref("DeadLetterSummary")}},
                            }
                        ),
                    },
                    "404": _error("No such function"),
                },
            },
        },
        "/v1/functions/{name}/dlq/{event_id}": {
            "parameters": [_NAME, _EVENT_ID],
            "get": {
                "summary": "One dead-lettered event: payload, last error, attempts",
                "responses": {
                    "200": {"description": "OK", "content": _json(_ref("DeadLetter"))},
                    "404": _error("No such function or dead letter"),
                },
            },
        },
        "/v1/functions/{name}/dlq/redrive": {
            "parameters": [_NAME],
            "post": {
                "summary": "Queue dead letters again as new events (all of them, or those named)",
                "requestBody": {
                    "required": False,
                    "content": _json(
                        {"type": "object", "properties": {"event_ids": {"type": "array", "items": {"type": "string"}}}}
                    ),
                },
                "responses": {
                    "200": {
                        "description": "The ids queued",
                        "content": _json(
                            {
                                "type": "object",
                                "properties": {"redriven": {"type": "array", "items": {"type": "string"}}},
                            }
                        ),
                    },
                    "404": _error("No such function or dead letter"),
                },
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    config_schema = FunctionConfig.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    defs = config_schema.pop("$defs", {})
    function = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "workspace": {"type": "string"},
            "arn": {"type": "string"},
            "version": {"type": "string"},
            "revision_id": {"type": "string"},
            "runtime": {"type": "string"},
            "handler": {"type": "string"},
            "memory": {"type": "integer"},
            "timeout": {"type": "integer"},
            "state": {"type": "string"},
            "code_sha256": {"type": "string"},
            "code_size_bytes": {"type": "integer"},
            "last_modified": {"type": "string", "format": "date-time"},
            "log_group": {"type": "string"},
            "instances": {"type": "object", "additionalProperties": {"type": "integer"}},
            "config": _ref("FunctionConfig"),
        },
    }
    error = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "description": "Stable error type, e.g. Client.InvalidPackage"},
                    "message": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["type", "message"],
            }
        },
    }
    log_page = {
        "type": "object",
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "stream": {"type": "string"},
                        "invocation_id": {"type": ["string", "null"]},
                        "timestamp_ms": {"type": "integer"},
                        "message": {"type": "string"},
                    },
                },
            },
            "next_after_id": {"type": ["integer", "null"]},
            "server_time_ms": {"type": "integer"},
        },
    }
    paths: dict[str, Any] = {
        "/v1/health": {"get": {"summary": "Platform health", "responses": {"200": {"description": "OK"}}}},
        "/v1/runtimes": {
            "get": {"summary": "Runtimes this server offers", "responses": {"200": {"description": "OK"}}}
        },
        "/v1/functions": {
            "get": {
                "summary": "List functions",
                "responses": {"200": {"description": "OK", "content": _json({"type": "object"})}},
            },
            "post": {
                "summary": "Create a function from a zip package",
                "requestBody": _ZIP_BODY,
                "responses": {
                    "201": {"description": "Created", "content": _json(_ref("Function"))},
                    "400": _error("Invalid package or hexabase.yaml"),
                    "409": _error("The function exists"),
                    "413": _error("Package too large"),
                },
            },
        },
        "/v1/functions/{name}": {
            "parameters": [_NAME],
            "get": {
                "summary": "Get a function",
                "responses": {
                    "200": {"description": "OK", "content": _json(_ref("Function"))},
                    "404": _error("No such function"),
                },
            },
            "put": {
                "summary": "Create or replace a function's code and configuration (deploy)",
                "requestBody": _ZIP_BODY,
                "responses": {
                    "200": {"description": "Updated", "content": _json(_ref("Function"))},
                    "201": {"description": "Created", "content": _json(_ref("Function"))},
                    "400": _error("Invalid package or hexabase.yaml"),
                    "413": _error("Package too large"),
                },
            },
            "patch": {
                "summary": "Change configuration fields (memory, timeout, environment, ...)",
                "requestBody": {"required": True, "content": _json({"type": "object"})},
                "responses": {
                    "200": {"description": "Updated", "content": _json(_ref("Function"))},
                    "400": _error("Invalid configuration"),
                    "404": _error("No such function"),
                },
            },
            "delete": {
                "summary": "Delete a function, its instances and its logs",
                "responses": {"204": {"description": "Deleted"}, "404": _error("No such function")},
            },
        },
        "/v1/functions/{name}/logs": {
            "parameters": [_NAME],
            "get": {
                "summary": "Read a function's log events, oldest first",
                "parameters": [
                    {"name": "since_ms", "in": "query", "schema": {"type": "integer"}},
                    {"name": "after_id", "in": "query", "schema": {"type": "integer"}},
                    {"name": "invocation_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 10000}},
                ],
                "responses": {"200": {"description": "OK", "content": _json(_ref("LogPage"))}},
            },
        },
        **_async_paths(),
        "/2015-03-31/functions/{name}/invocations": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "Qualifier", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "X-Amz-Invocation-Type",
                    "in": "header",
                    "schema": {"enum": ["RequestResponse", "Event", "DryRun"]},
                },
                {"name": "X-Amz-Log-Type", "in": "header", "schema": {"enum": ["None", "Tail"]}},
                {"name": "X-Amz-Client-Context", "in": "header", "schema": {"type": "string"}},
            ],
            "post": {
                "summary": "Invoke a function (AWS Lambda's Invoke API)",
                "requestBody": {"content": _json({})},
                "responses": {
                    "200": {"description": "The function's result, or its error document with X-Amz-Function-Error"},
                    "202": {"description": "Event: the event is stored and queued; x-amzn-RequestId names it"},
                    "204": {"description": "DryRun: the request is valid"},
                    "404": {"description": "ResourceNotFoundException"},
                    "413": {"description": "RequestTooLargeException"},
                    "429": {"description": "TooManyRequestsException"},
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "hxb", "version": __version__, "description": "hxb management and invoke API"},
        "paths": paths,
        "components": {
            "schemas": {
                "FunctionConfig": config_schema,
                **defs,
                "Function": function,
                "Error": error,
                "LogPage": log_page,
                **_async_schemas(),
            }
        },
    }
