"""Fixtures of the batch tests: the tiny OPT model, loaded once in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

import blip2


@pytest.fixture(scope="session")
def model(opt_ckpt: Path) -> blip2.Blip2:
    return blip2.load(opt_ckpt, device="cpu", dtype="fp32")
