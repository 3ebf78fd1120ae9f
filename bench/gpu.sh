#!/usr/bin/env bash
# The GPU checks in one go, on a machine whose python3 holds a CUDA PyTorch (no network needed):
#   bash bench/gpu.sh [OUTDIR]
# tests/test_cuda.py (parity with transformers in fp16/bf16, int8, compiled decoding), then full-size
# blip2-opt-2.7b (random weights) on the GPU: latency and batch throughput against transformers in the same
# process, eager and compiled (static KV cache, CUDA graphs), the server under 8 clients, batched vs one by one,
# and, where the machine's python3 has vLLM (its CUDA build), batch captioning on the vLLM engine against vLLM
# given the images directly. Every step has its own time limit and runs whatever the others did; logs and JSON
# results go to OUTDIR (default bench/results). All steps take ~17 minutes: STEPS picks some.
# Packages missing on the machine may be put as wheels in .whl/: they are installed into a temporary folder first.
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"

all="test_cuda checkpoint latency throughput latency_compiled throughput_compiled serve_load vllm"
steps=" ${STEPS:-$all} "  # STEPS="a b": only those
step() {  # step NAME SECONDS COMMAND...: its log in OUTDIR/NAME.log, its tail here
  local name=$1 limit=$2 log=$out/$1.log; shift 2
  [[ $steps == *" $name "* ]] || return 0
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" >"$log" 2>&1
  echo "== $name exit $? ($(date +%T))"; tail -n 15 "$log"
}
step test_cuda 110 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider
step checkpoint 80 python3 -c "import sys, tempfile, pathlib; sys.path[:0] = ['bench', 'tests']; import common; \
common.make_full_checkpoint(pathlib.Path(tempfile.gettempdir()) / 'blip2-bench' / 'opt-2.7b')"
step latency 80 python3 bench/latency.py --device cuda --dtype fp16 --in-process --repeat 3
step throughput 150 python3 bench/throughput.py --full --device cuda --dtype fp16 --images 96 --repeat 3
step latency_compiled 150 python3 bench/latency.py --device cuda --dtype fp16 --in-process --repeat 3 --compile
step throughput_compiled 200 python3 bench/throughput.py --full --device cuda --dtype fp16 --images 96 --repeat 3 \
  --compile
step serve_load 170 python3 bench/serve_load.py --full --device cuda --dtype fp16 --duration 30 --warmup 6 \
  --out bench/results/serve_load_full_cuda_fp16.json
if python3 -c "import vllm" 2>/dev/null; then
  BLIP2_VLLM_PYTHON=$(command -v python3) step vllm 240 python3 bench/throughput.py --full --device cuda --dtype fp16 \
    --images 96 --repeat 1 --engine vllm
else
  echo "== vllm: skipped, python3 has no vllm (install its CUDA build, or put its wheels in .whl/)"
fi
cp bench/results/*cuda*.json "$out"/ 2>/dev/null
ls -la "$out"
