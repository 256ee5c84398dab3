"""Runtimes: which language runtimes this host offers (`hxb runtimes`) and where their
interpreters and bootstraps live."""

from __future__ import annotations

from hxb.runtimes.catalog import RuntimeCatalog, RuntimeInfo

__all__ = ["RuntimeCatalog", "RuntimeInfo"]
