"""The `augsvc` command line: `main`, the parser, one module per subcommand (`COMMANDS`).

Also the pieces only commands use: `preview_grid` (the picture `augsvc preview` draws),
`progress` (a progress bar) and `_common` (options several commands share).
"""

from augsvc.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
