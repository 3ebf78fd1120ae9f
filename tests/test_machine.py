"""`blip2 doctor` and `blip2.machine`: if these fail, the doctor crashes or prints figures that are not measurements
(zero or negative rates, a crossover that contradicts its own timings)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from blip2.cli import main
from blip2.machine import crossover, format_report, report


def test_crossover_is_where_the_wide_route_wins_from_then_on() -> None:
    times = {1: {"n": 1.0, "w": 5.0}, 8: {"n": 2.0, "w": 1.5}, 16: {"n": 3.0, "w": 4.0}, 64: {"n": 9.0, "w": 5.0}}
    assert crossover(times, "n", "w") == 64  # 8 wins alone but 16 does not: not from 8 on
    assert crossover({1: {"n": 1.0, "w": 2.0}}, "n", "w") is None


def test_report_on_small_shapes_is_measured_and_printable() -> None:
    r = report(lm_shape=(64, 128), vision=(8, 64, 64), memory_mib=8)
    assert r["memory"]["copy_gbs"] > 0 and r["memory"]["read_gbs"] > 0
    assert all(v > 0 for v in r["gemm_gflops"].values())
    assert set(r["kernels_ms"]) == {1, 4, 8, 24, 64, 257}
    routes = {"fp32", "bf16", "bf16 widened to fp32", "int8", "int8 widened to fp32"}
    assert all(set(t) == routes and min(t.values()) > 0 for t in r["kernels_ms"].values())
    assert r["crossover"]["int8"]["measured"] in (None, *r["kernels_ms"])
    assert r["dtype_auto"] in ("float32", "bfloat16")
    text = format_report(r)
    assert r["cpu"] in text and "route      int8" in text
    json.dumps(r)


def test_doctor_command_prints_json(monkeypatch) -> None:
    import blip2.machine as machine

    small = machine.report
    monkeypatch.setattr(machine, "report", lambda: small(lm_shape=(64, 128), vision=(8, 64, 64), memory_mib=8))
    result = CliRunner().invoke(main, ["doctor", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"] == 1
