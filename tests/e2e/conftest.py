"""Fixtures of the e2e tier."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3  # type: ignore[import-untyped]  # no stubs installed (boto3-stubs)
import pytest
from botocore.config import Config  # type: ignore[import-untyped]

from tests.conftest import HxbServer


@pytest.fixture(scope="module")
def lambda_client(hxb_server: HxbServer) -> Iterator[Any]:
    """boto3's `lambda` client, unchanged, pointed at the module's server."""
    client = boto3.client(
        "lambda",
        endpoint_url=hxb_server.endpoint,
        region_name="local",
        aws_access_key_id="x",
        aws_secret_access_key="x",  # noqa: S106 -- hxb ignores the signature; boto3 wants one
        # One attempt: a platform failure must show, not be retried away.
        config=Config(retries={"max_attempts": 1}, read_timeout=120),
    )
    yield client
    client.close()
