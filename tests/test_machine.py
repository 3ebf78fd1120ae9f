"""`blip2 doctor` and `blip2.machine`: if these fail, the doctor crashes or prints figures that are not measurements
(zero or negative rates), or hides the routes loads use."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_routes import AVX2_LIKE

from blip2 import routes
from blip2.cli import main
from blip2.int4 import can_int4
from blip2.machine import format_report


@pytest.fixture
def fake_routes(monkeypatch, tmp_path):
    """The route timings given (test_routes.AVX2_LIKE), the cache in tmp_path; the machine's limits measured small."""
    import blip2.machine as machine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(routes, "measure", lambda: calls.append(1) or AVX2_LIKE)
    small = machine.report
    monkeypatch.setattr(machine, "report", lambda recalibrate=False: small(recalibrate, (8, 64, 64), 8))
    return calls


def test_report_is_measured_and_printable(fake_routes):
    import blip2.machine as machine

    r = machine.report()
    assert r["memory"]["copy_gbs"] > 0 and r["memory"]["read_gbs"] > 0
    assert all(v > 0 for v in r["gemm_gflops"].values())
    assert r["measured"]["kernels"]["int8_lm"] == 16 and r["measured"]["auto"] == "fp32"
    assert r["in_use"]["source"] == "BLIP2_ROUTES=flags"  # the test suite's override, shown beside the measurement
    text = format_report(r)
    assert r["cpu"] in text and "int8 LM from 16 positions" in text and "not for auto" in text
    json.dumps(r)


def test_doctor_prints_json_and_recalibrates(fake_routes):
    result = CliRunner().invoke(main, ["doctor", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"] == 1
    assert CliRunner().invoke(main, ["doctor"]).exit_code == 0
    assert len(fake_routes) == 1  # the second run read the cache
    assert CliRunner().invoke(main, ["doctor", "--recalibrate"]).exit_code == 0
    assert len(fake_routes) == 2


def test_a_hopeless_int8_gemm_is_timed_once_not_at_every_row_count(monkeypatch):
    """If this fails, the first load on a CPU without VNNI or AMX (int8 GEMMs at ~1% of fp32's speed) spends many
    seconds timing int8 activations at every row count, and an image's 257 rows, for a route it will never take."""
    import time

    import blip2.machine as machine
    import blip2.quant as quant

    calls = []
    monkeypatch.setattr(quant, "_int8_activations_mm", lambda *a: calls.append(1) or time.sleep(0.02))
    hopeless: set[str] = set()
    t = machine.kernels(64, 64, rows=(1, 8, 48), hopeless=hopeless)
    int8_acts = {"int8 activations", "int8 activations packed"}
    absent = set() if can_int4("bf16") else {"int4 bf16"}  # our int4 kernel needs AVX512-BF16 and a compiler
    assert calls and all(t[1][name] >= 20 for name in int8_acts) and hopeless == int8_acts | absent
    assert all(t[8][name] == t[48][name] == float("inf") for name in int8_acts)
    assert all(0 < ms < float("inf") for r in t for name, ms in t[r].items() if name not in int8_acts | absent)
    n = len(calls)
    vision = machine.kernels(64, 64, rows=(257,), hopeless=hopeless)[257]
    assert all(vision[name] == float("inf") for name in int8_acts)
    assert len(calls) == n  # the vision shape's timing skips them too


def test_an_int4_kernel_that_is_not_built_is_never_timed_as_one(monkeypatch):
    """If this fails, on a machine where our int4 kernel could not be built the calibration times PyTorch's kernel
    under our kernel's name (the int4 quantizer stands PyTorch's in), and `blip2 doctor` shows a speed for a
    kernel that is not there."""
    import blip2.int4 as int4
    import blip2.machine as machine

    monkeypatch.setattr(int4, "can_int4", lambda kernel="torch": kernel == "torch")
    t = machine.kernels(64, 64, rows=(1,), names=("int4", "int4 bf16"))[1]
    assert t["int4 bf16"] == float("inf") and 0 < t["int4"] < float("inf")


def test_kernels_read_weight_copies_in_turn(monkeypatch):
    """If this fails, the routes are timed on one weight that stays in the CPU's cache between calls (a 26 MB int8
    fc1 fits a 32 MB L3): decoding is then timed up to twice as fast as a model, whose weights come from memory,
    ever decodes, and the routes and `blip2 doctor`'s caption estimates are decided on that."""
    import blip2.machine as machine
    import blip2.quant as quant

    seen = []
    monkeypatch.setattr(quant, "_int8_activations_mm", lambda x, w, s: seen.append(w.data_ptr()))
    monkeypatch.setattr(machine, "COPIES_BYTES", 3 * 64 * 64)  # three int8 64 x 64 weights
    machine.kernels(64, 64, rows=(1,), names=("int8 activations",))
    assert len(seen) >= 4 and len(set(seen)) == 3  # a warm-up and three timed calls, each on the next copy
