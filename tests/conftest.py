"""Shared pytest setup: offline Hugging Face, `tests/` importable, and session-wide tiny BLIP-2 checkpoints."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported by any test module, so nothing can reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import fixtures  # noqa: E402  (needs sys.path above)


@pytest.fixture(scope="session")
def opt_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """blip2-opt style checkpoint, safetensors, with `image_token_index`."""
    return fixtures.make_opt_checkpoint(tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="session")
def opt_ckpt_old(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as `opt_ckpt` but a pre-4.47 config.json without `image_token_index`."""
    return fixtures.make_opt_checkpoint(tmp_path_factory.mktemp("opt_old"), image_token=False)


@pytest.fixture(scope="session")
def opt_ckpt_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as `opt_ckpt` split over several safetensors shards with an index json."""
    return fixtures.make_opt_checkpoint(tmp_path_factory.mktemp("opt_sharded"), max_shard_size="200KB")


@pytest.fixture(scope="session")
def opt_ckpt_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as `opt_ckpt` as a single `pytorch_model.bin`, no safetensors."""
    return fixtures.make_opt_checkpoint(tmp_path_factory.mktemp("opt_bin"), safe=False)


@pytest.fixture(scope="session")
def t5_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """blip2-flan-t5 style checkpoint."""
    return fixtures.make_t5_checkpoint(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def itm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """blip2-itm style checkpoint (Q-Former with text input, BERT tokenizer)."""
    return fixtures.make_itm_checkpoint(tmp_path_factory.mktemp("itm"))


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small images in many modes plus broken files, keyed by `fixtures.make_images` names."""
    return fixtures.make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def vllm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny blip2-opt checkpoint vLLM's CPU build can run (`fixtures.VLLM_OPT`: head size 32)."""
    return fixtures.make_opt_checkpoint(tmp_path_factory.mktemp("vllm_opt"), text=fixtures.VLLM_OPT)


@pytest.fixture(scope="session")
def vllm_model(vllm_ckpt: Path) -> Iterator:
    """One vLLM engine on `vllm_ckpt` for the whole session (it takes about a minute to start on 2 cores); the
    tests that use it skip, saying why, where vLLM is not installed or cannot start."""
    import blip2
    from blip2.engines.vllm import find_python
    from blip2.errors import Blip2Error

    try:
        find_python()
    except Blip2Error as e:
        pytest.skip(f"vLLM is not available: {e}")
    try:
        m = blip2.load(vllm_ckpt, engine="vllm", dtype="fp32")
    except Blip2Error as e:
        pytest.skip(f"vLLM could not start on this machine: {e}")
    yield m
    m.close()


@pytest.fixture(scope="session")
def vllm_ours(vllm_ckpt: Path):
    """Our engine on the same checkpoint, in fp32: the reference for vLLM's tokens."""
    import blip2

    return blip2.load(vllm_ckpt, dtype="fp32", device="cpu")
