"""Sandboxes: how instance processes are started and isolated."""
