"""Load test of `blip2 serve`: N concurrent clients for a fixed time, batching on versus off, in one run.

    python bench/serve_load.py                         # tiny random checkpoint (built here), 8 clients, 20 s per mode
    python bench/serve_load.py --model PATH            # any local checkpoint
    python bench/serve_load.py --full                  # full-size random-weight checkpoint (bench/common.py)
    python bench/serve_load.py --engine vllm --clients 8 --clients 32   # ours+vLLM beside `vllm serve` itself

With `--engine vllm` the modes are our server on our engine (micro-batches of 8), our server with `--engine vllm`
(continuous batching in vLLM behind our API) and vLLM's own OpenAI server on the same checkpoint
(`blip2.engines.vllm.VllmServer`, the arguments our engine uses); requests to vLLM are streamed, so their results
also have the time to first token (`ttft_p50_ms`) and p95 latency (our engine streams an answer alone, so its
mode sends unstreamed requests, which it batches). Every request carries an image not sent before (vLLM's
prefix cache and our image cache would skip the vision encoder for a repeated one).

Each mode starts its own server on a free loopback port (`--max-batch-size 8` vs `--max-batch-size 1`), sends
OpenAI chat completions (one image, one question, greedy, fixed length so every request costs the same) from
`--clients` asyncio clients for `--duration` seconds after a short warm-up, and records requests/s (see
`steady_rate`), p50/p99 latency and errors. Results go to bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["what is it?", "where is the cat?", "what color is the car?", "how many dogs are there?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import fixtures  # the tests' tiny random checkpoint builder

    # vLLM's CPU attention needs head sizes of 32 or more: the tests' vLLM checkpoint serves both engines
    return fixtures.make_opt_checkpoint(folder / "tiny-opt", text=fixtures.VLLM_OPT)


def full_checkpoint() -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from common import make_full_checkpoint  # the blip2-opt-2.7b shape, reused from the other benchmarks

    return make_full_checkpoint(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b")


def image_uris(count: int) -> list[str]:
    """Distinct small JPEGs, so requests are not all the same image."""
    rng = np.random.default_rng(0)
    uris = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, format="JPEG")
        uris.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return uris


def start_server(
    model: Path, batch: int, args: argparse.Namespace, log: Path, engine: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "blip2",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--max-batch-size",
        str(batch),
        "--engine",
        engine,
        "--max-queue",
        "256",
        "--log-level",
        "warning",
    ]
    if args.max_wait_ms is not None:
        cmd += ["--max-wait-ms", str(args.max_wait_ms)]
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"server exited ({proc.returncode}); log: {log}\n{tail}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server not ready after {args.load_timeout} s; log: {log}")


async def client_loop(
    client: httpx.AsyncClient,
    worker: int,
    uris: list[str],
    stop_at: float,
    measure_from: float,
    args: argparse.Namespace,
    out: dict,
) -> None:
    i = worker
    while time.monotonic() < stop_at:
        payload = {
            "model": args.served,
            "stream": args.stream,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uris[i % len(uris)]}},
                        {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                    ],
                }
            ],
            "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens,
        }
        i += args.clients
        started = time.monotonic()
        first = None
        try:
            async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
                ok = r.status_code == 200
                async for line in r.aiter_lines():
                    if first is None and '"content":"' in line.replace(": ", ":") and '"content":""' not in line:
                        first = time.monotonic()
        except httpx.HTTPError:
            ok = False
        ended = time.monotonic()
        if measure_from <= ended <= stop_at:  # requests completed inside the measured window
            out["answers" if ok else "errors"].append((ended, ended - started, (first or ended) - started))


async def load(url: str, uris: list[str], args: argparse.Namespace) -> dict:
    out: dict = {"answers": [], "errors": []}
    now = time.monotonic()
    measure_from, stop_at = now + args.warmup, now + args.warmup + args.duration
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(
            *[client_loop(client, w, uris, stop_at, measure_from, args, out) for w in range(args.clients)]
        )
    lat = np.array([latency for _, latency, _ in out["answers"]]) * 1000
    ttft = np.array([first for _, _, first in out["answers"]]) * 1000
    rate = steady_rate(sorted(ended for ended, _, _ in out["answers"]))
    return {
        "requests": len(lat),
        "errors": len(out["errors"]),
        "requests_per_s": round(rate, 3) if rate is not None else None,
        # Little's law for a closed loop (each client sends its next request at once): clients / mean latency; it
        # holds when answers come in clusters (32 requests batched together end together), where the above does not
        "requests_per_s_closed_loop": round(args.clients / (float(lat.mean()) / 1000), 3) if len(lat) else None,
        "mean_ms": round(float(lat.mean()), 1) if len(lat) else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1) if args.stream and len(ttft) else None,
    }


def gpu_name() -> str | None:
    import torch  # only here: the clients need no torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def steady_rate(ends: list[float], together: float = 0.05) -> float | None:
    """Answers per second from the first answer in the window to the last, leaving out the answers that came with
    the first (one batch). Answers counted over the fixed window would be off by up to a whole batch, since a
    batch's answers arrive together (at full size, 8 every ~70 s: +-50% in a 150 s window); this is exact for
    batches of steady size and duration."""
    if len(ends) < 2 or ends[-1] - ends[0] <= together:
        return None
    first = sum(1 for e in ends if e - ends[0] <= together)
    return (len(ends) - first) / (ends[-1] - ends[0])


def run_mode(
    model: Path, batch: int, uris: list[str], args: argparse.Namespace, logdir: Path, engine: str | None = None
) -> dict:
    engine = engine or args.engine
    args.stream = engine == "vllm"  # our engine streams an answer alone in its worker; unstreamed, it batches
    proc, url = start_server(model, batch, args, logdir / f"server-{engine}-batch{batch}.log", engine)
    try:
        result = asyncio.run(load(url, uris, args))
        stats = httpx.get(f"{url}/healthz").json().get("batches", {})
        if stats.get("batches"):
            result["mean_batch_size"] = round(stats["requests"] / stats["batches"], 2)
            result["largest_batch"] = stats["largest"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result["max_batch_size"] = batch
    print(f"max-batch-size {batch}: {json.dumps(result)}", flush=True)
    return result


def run_vllm_serve(model: Path, uris: list[str], args: argparse.Namespace) -> dict:
    """vLLM's own OpenAI server on `model`, started as the vLLM engine starts it, under the same load."""
    from transformers import AutoTokenizer

    from blip2.engines.vllm import VLLM_DTYPES, VllmServer, check_checkpoint, find_python

    overrides = check_checkpoint(model, AutoTokenizer.from_pretrained(model))
    server = VllmServer(model, find_python(), VLLM_DTYPES[args.dtype], overrides, timeout_s=args.load_timeout)
    args.stream = True  # time to first token, as through our server
    try:
        result = asyncio.run(load(server.url, uris, args))
    finally:
        server.close()
    print(f"vllm serve: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder [a tiny random one built here]")
    parser.add_argument("--full", action="store_true", help="full-size random-weight checkpoint (bench/common.py)")
    parser.add_argument("--clients", type=int, action="append", help="concurrent clients; repeat for several [8]")
    parser.add_argument("--engine", choices=["ours", "vllm"], default="ours", help="vllm: ours+vLLM and vllm serve")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, help="the server's --max-wait-ms [its default]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--load-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        tmp_path = Path(tmp)
        if args.model is not None:
            model, kind = args.model, "given"
        elif args.full:
            model, kind = full_checkpoint(), "full-size random blip2-opt-2.7b"
        else:
            model, kind = tiny_checkpoint(tmp_path), "tiny random opt"
        uris = image_uris(2048)  # distinct: vLLM's prefix cache and ours skip an image seen before
        args.served = str(model)
        by_clients = {}
        for clients in args.clients or [8]:
            args.clients = clients
            if args.engine == "vllm":
                modes = {
                    "ours": run_mode(model, 8, uris, args, tmp_path, engine="ours"),
                    "ours+vllm": run_mode(model, 8, uris, args, tmp_path),
                    "vllm_serve": run_vllm_serve(model, uris, args),
                }
            else:
                modes = {
                    "batched": run_mode(model, 8, uris, args, tmp_path),
                    "one_by_one": run_mode(model, 1, uris, args, tmp_path),
                }
            by_clients[clients] = modes
    if args.engine == "vllm":
        from blip2.machine import cpu_flags, cpu_name

        report = {"benchmark": "serve_load", "engine": "vllm", "model": str(args.model) if args.model else kind,
                  "max_tokens": args.max_tokens, "dtype": args.dtype, "cpu": cpu_name(), "cpu_flags": cpu_flags(),
                  "cpu_count": os.cpu_count(), "duration_s": args.duration, "clients": by_clients}  # fmt: skip
        for modes in by_clients.values():
            rates = modes["ours+vllm"]["requests_per_s_closed_loop"], modes["vllm_serve"]["requests_per_s_closed_loop"]
            modes["ours_over_vllm_serve"] = round(rates[0] / rates[1], 3) if all(rates) else None
        args.out = args.out.with_name(args.out.stem + "_vllm.json") if args.out.name == "serve_load.json" else args.out
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {args.out}")
        return
    batched, one_by_one = modes["batched"], modes["one_by_one"]
    rates = batched["requests_per_s"], one_by_one["requests_per_s"]
    speedup = rates[0] / rates[1] if all(rates) else None
    report = {
        "benchmark": "serve_load",
        "model": str(args.model) if args.model else kind,
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "max_wait_ms": args.max_wait_ms if args.max_wait_ms is not None else "server default",
        "dtype": args.dtype,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "gpu": gpu_name() if args.device.startswith("cuda") else None,
        "batched": batched,
        "one_by_one": one_by_one,
        "throughput_speedup": round(speedup, 2) if speedup else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"throughput batched / one-by-one: {report['throughput_speedup']}x -> {args.out}")


if __name__ == "__main__":
    main()
