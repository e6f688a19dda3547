"""``python -m random_ltd_cli`` runs the CLI."""

from .cli import main

main()
