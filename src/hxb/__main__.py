"""`python -m hxb` runs the CLI."""

from hxb.cli.main import main

main()
