"""The `blip2` command. Each command lives in its own module and is registered here.

Command modules import torch and the model lazily, inside the command, so `blip2 --help` stays fast.
A `Blip2Error` (bad file, bad value) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

# (module, command names): a module missing its command is a bug; these modules are part of the package.
COMMANDS: list[tuple[str, list[str]]] = [
    ("generate", ["caption", "ask", "chat", "models"]),
    ("serve", ["serve"]),
    ("eval", ["eval"]),
    ("train", ["train"]),
    ("retrieval", ["index", "search"]),
    ("miniature", ["demo", "miniature"]),
    ("doctor", ["doctor"]),
]


class Blip2Group(click.Group):
    def invoke(self, ctx: click.Context):
        from ..errors import Blip2Error

        try:
            return super().invoke(ctx)
        except Blip2Error as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Blip2Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="blip2")
def main() -> None:
    """BLIP-2: caption, question, chat about and search images."""


for _module, _names in COMMANDS:
    _mod = importlib.import_module(f"{__name__}.{_module}")
    for _name in _names:
        main.add_command(getattr(_mod, _name.replace("-", "_")))
