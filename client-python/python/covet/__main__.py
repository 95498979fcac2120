"""``python -m covet run MODULE:APP``: imports ``APP`` (a :class:`covet.App`)
from ``MODULE`` and runs it until SIGINT or SIGTERM. Without ``:APP``,
the default app that module-level ``@covet.on_event`` registers on."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys

from .app import App, default_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covet")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an app's handlers")
    run.add_argument("target", help="MODULE or MODULE:APP")
    args = parser.parse_args(argv)
    module_name, _, attr = args.target.partition(":")
    # The current directory first, as `python -m` users expect of a
    # service's own module.
    sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    app = getattr(module, attr) if attr else default_app()
    if not isinstance(app, App):
        parser.error(f"{args.target} is not a covet.App")
    asyncio.run(app.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
