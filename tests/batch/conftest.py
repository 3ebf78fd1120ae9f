"""Fixtures of the batch tests: the tiny OPT model in fp32, once with each engine (vLLM's skips, saying why, where
it is absent): every guarantee of a batch run holds whichever engine captions."""

from __future__ import annotations

from pathlib import Path

import pytest

import blip2


@pytest.fixture(scope="session")
def ours_model(opt_ckpt: Path) -> blip2.Blip2:
    return blip2.load(opt_ckpt, device="cpu", dtype="fp32")


@pytest.fixture(params=["ours", pytest.param("vllm", marks=pytest.mark.vllm)])
def model(request: pytest.FixtureRequest):
    return request.getfixturevalue("ours_model" if request.param == "ours" else "vllm_model")
