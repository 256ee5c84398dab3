"""Public HTTP API: the gateway that turns HTTP requests into invocations."""
