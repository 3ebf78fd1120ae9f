# The miniature BLIP-2 (src/blip2/train/miniature.py): `make miniature` trains it from nothing on the shapes world
# (about 20-30 minutes on a 2-core CPU) and exports it to examples/miniature; `make demo` runs it, offline.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)
WORK ?= build/miniature

.PHONY: miniature demo

miniature:
	HF_HUB_OFFLINE=1 nice -n 19 $(PYTHON) -m blip2.train.miniature build --work $(WORK) --export examples/miniature

demo:
	HF_HUB_OFFLINE=1 $(PYTHON) -m blip2.train.miniature demo examples/miniature
