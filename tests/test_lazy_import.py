"""`import blip2` and `blip2 --help` stay light: neither imports torch nor transformers (seconds each to import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

# Runs in a fresh interpreter: the test process has long imported torch.
PROBE = """
import json, sys
{body}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & {heavy})))
"""

HELP = """
from blip2.cli import main
try:
    main({args!r}, prog_name="blip2")
except SystemExit as e:
    assert e.code in (0, None), e.code
"""


def heavy_modules_after(body: str) -> list[str]:
    script = PROBE.format(body=body, heavy=set(HEAVY))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_blip2_imports_neither_torch_nor_transformers():
    """If this fails, `import blip2` (and every `blip2` command, even --help) pays seconds of torch import."""
    assert heavy_modules_after("import blip2\nassert blip2.__version__ and 'load' in dir(blip2)") == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["caption", "--help"],
        ["ask", "--help"],
        ["chat", "--help"],
        ["models", "--help"],
        ["serve", "--help"],
        ["eval", "caption", "--help"],
        ["eval", "vqa", "--help"],
        ["eval", "retrieval", "--help"],
        ["train", "--help"],
        ["index", "--help"],
        ["search", "--help"],
        ["demo", "--help"],
        ["miniature", "build", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_neither_torch_nor_transformers(args):
    """If this fails, a command module imports the model at the top: `blip2 --help` takes seconds instead of 0.1 s."""
    assert heavy_modules_after(HELP.format(args=args)) == []


def test_public_names_still_load():
    """The lazy package must still give every public name, and the submodules `import blip2` used to load."""
    script = (
        "import blip2, blip2.pipeline as p, blip2.errors as e\n"
        "assert all(getattr(blip2, n) is getattr(p if hasattr(p, n) else e, n) for n in blip2.__all__)\n"
        "from blip2 import Blip2, ImageError, load\n"
        "assert blip2.config.KNOWN_MODELS\n"
    )
    assert "torch" in heavy_modules_after(script)


def test_unknown_attribute_is_an_attribute_error():
    import blip2

    with pytest.raises(AttributeError, match="no_such_name"):
        blip2.no_such_name  # noqa: B018
