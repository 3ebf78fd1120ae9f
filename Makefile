# The miniature BLIP-2 (src/blip2/train/miniature.py): `make miniature` trains it from nothing on the shapes world
# (about 20-30 minutes on a 2-core CPU) and exports it to examples/miniature; `make demo` runs it, offline.
# Both are `blip2` commands (`blip2 miniature build`, `blip2 demo`), which set HF_HUB_OFFLINE=1 themselves.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)
BLIP2 ?= $(PYTHON) -m blip2
WORK ?= build/miniature

.PHONY: miniature demo

miniature:
	nice -n 19 $(BLIP2) miniature build --work $(WORK) --export examples/miniature

demo:
	$(BLIP2) demo examples/miniature
