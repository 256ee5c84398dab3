"""The `hxb` command line."""
