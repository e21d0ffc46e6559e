"""Subcommands of the `augsvc` CLI, one module each (see `augsvc.cli`)."""
