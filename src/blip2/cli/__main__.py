"""`python -m blip2.cli ...`, as `accelerate launch -m blip2.cli train ...` runs it: the `blip2` command."""

from . import main

main(prog_name="blip2")
