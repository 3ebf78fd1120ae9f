"""CPU routes chosen by measurement (blip2.routes), with given timings: no test here depends on this machine's speed.

If these fail, a load picks a slower kernel than its own measurement shows, `dtype="auto"` picks a route whose
quality was not shown to match transformers' bf16, the cache is re-measured at every start (seconds per load) or
reused on another machine, or a damaged cache file crashes loading."""

from __future__ import annotations

import json

import pytest
import torch

from blip2 import machine, quant, routes
from blip2.dtype_policy import placement, resolve_dtype
from blip2.errors import ConfigError
from blip2.quant import NEVER, Int8Linear, StoredLinear
from blip2.route_quality import QUALITY, YARDSTICK, allowed

LM_NAMES, VISION_NAMES = routes.LM_NAMES, routes.VISION_NAMES


def timings(lm: dict[str, list[float]], vision: dict[str, float]) -> routes.Timings:
    """lm: route -> ms at each of routes.LM_ROWS; vision: route -> ms at 257 rows."""
    return {
        "lm": {r: {n: lm[n][i] for n in LM_NAMES} for i, r in enumerate(routes.LM_ROWS)},
        "vision": {routes.VISION_ROWS: dict(vision)},
    }


#                     rows:   1    4    8    16   32   48
AVX2_LIKE = timings(
    {
        "fp32": [10, 12, 14, 20, 30, 40],
        "bf16": [9, 20, 45, 90, 180, 270],  # emulated: fast at one row only
        "bf16 packed": [8, 19, 44, 89, 179, 269],  # faster, but these layers are widened from 4 rows: not packed
        "bf16 widened to fp32": [15, 16, 21, 25, 31, 38],
        "int8": [5, 8, 15, 40, 80, 110],
        "int8 widened to fp32": [12, 13, 19, 24, 30, 37],
        "int8 activations": [60] + [float("inf")] * 5,  # no VNNI: too slow to time beyond one row
        "int8 activations packed": [float("inf")] * 6,
        "int4": [7, 20, 40, 80, 160, 240],  # slower than the int8 kernel at one row: int4 would decode on int8
        "int4 bf16": [float("inf")] * 6,  # no AVX512-BF16: our int4 kernel is not built
    },
    {
        "fp32": 97,
        "bf16": 494,
        "bf16 packed": 490,
        "bf16 widened to fp32": 82,
        "int8 activations": float("inf"),
        "int8 activations packed": float("inf"),
    },
)
AMX_LIKE = timings(
    {
        "fp32": [10, 12, 14, 20, 30, 40],
        "bf16": [5, 6, 7, 8, 9, 10],  # native bf16 beats everything
        "bf16 packed": [3, 4, 5, 7, 8, 9],  # and prepacked weights beat it at every row count
        "bf16 widened to fp32": [15, 16, 21, 25, 31, 38],
        "int8": [3, 4, 6, 12, 20, 30],
        "int8 widened to fp32": [12, 13, 19, 24, 30, 37],
        "int8 activations": [2, 3, 4, 6, 9, 12],  # AMX/VNNI: int8 x int8 beats the int8-weight kernel everywhere
        "int8 activations packed": [2.5, 2, 2.5, 4, 7, 9],  # prepacked: slower at one row, faster from 4
        "int4": [1, 3, 6, 12, 24, 36],  # half the bytes: fastest at one row, compute-bound from a few
        "int4 bf16": [0.7, 2.5, 5, 10, 20, 30],  # ours: nearer the memory's speed
    },
    {
        "fp32": 97,
        "bf16": 20,
        "bf16 packed": 18,
        "bf16 widened to fp32": 82,
        "int8 activations": 11,
        "int8 activations packed": 9,
    },
)


def test_each_kind_takes_the_faster_measured_route():
    avx2 = routes.choose(AVX2_LIKE).kernels
    assert avx2.bf16_lm == 4  # widened wins from 4 rows on; one decoding row stays on the native kernel
    assert avx2.int8_lm == 16  # the int8 kernel wins up to 8 rows
    assert avx2.bf16_vision == 0 and avx2.int8_vision == 0  # fp32 on widened weights beats emulated bf16
    amx = routes.choose(AMX_LIKE).kernels
    assert amx.bf16_lm == amx.bf16_vision == NEVER and not amx.widens_bf16
    assert amx.int8_lm == NEVER and amx.int8_vision == NEVER  # the int8 kernel everywhere; vision on native bf16
    assert amx.bf16_packed_lm and amx.bf16_packed_vision  # prepacked: faster at every row count measured
    assert not avx2.bf16_packed_lm and not avx2.bf16_packed_vision  # widened layers are not packed


def test_int4_decodes_on_int4_only_where_one_row_measures_faster():
    """If this fails, `dtype="int4"` decodes on int4 weights on a CPU where PyTorch's int4 kernel is slower at one
    row than the int8 route's layers (an int4 copy that costs memory and time), or leaves them unused where they
    are faster; or `auto` picks int4, whose quality is below int8's."""
    avx2, amx = routes.choose(AVX2_LIKE), routes.choose(AMX_LIKE)
    assert not avx2.kernels.int4_decoding and amx.kernels.int4_decoding
    assert amx.caption_ms["int4"] < amx.caption_ms["int8-activations"] and not amx.allowed["int4"]
    assert avx2.caption_ms["int4"] == avx2.caption_ms["int8"]  # int4 without int4 decoding is int8
    assert "int4" not in (avx2.auto, amx.auto)


def test_the_int4_kernel_is_the_faster_over_one_to_eight_rows():
    """If this fails, `dtype="int4"` decodes on the slower of PyTorch's int4 kernel and ours (or on ours where it
    was not built: every decoding step would fail), or one noisy timing at one row count picks the kernel that is
    slower over the batches a step decodes."""
    assert routes.choose(AMX_LIKE).kernels.int4_kernel == "bf16"
    assert routes.choose(AVX2_LIKE).kernels.int4_kernel == "torch"  # ours absent: infinitely slow
    lm = AMX_LIKE["lm"]
    noisy = {r: t | {"int4 bf16": t["int4"] * (0.9 if r == 1 else 1.2)} for r, t in lm.items()}
    k = routes.choose({"lm": noisy, "vision": AMX_LIKE["vision"]}).kernels
    assert k.int4_kernel == "torch" and k.int4_decoding  # faster at one row, slower at 4 and 8 rows together


def test_packing_is_chosen_by_its_total_over_the_row_counts():
    """If this fails, one noisy timing at one row count (a busy machine during the calibration) unpacks every
    language-model layer, and decoding runs at half the speed until the cache is measured again; or packing that
    loses overall is kept."""
    noisy = {n: [10] * 6 for n in LM_NAMES} | {"bf16 widened to fp32": [99] * 6, "bf16 packed": [5, 5, 5, 11, 5, 5]}
    vision = {"fp32": 9, "bf16": 5, "bf16 packed": 4, "bf16 widened to fp32": 9} | dict.fromkeys(routes.INT8_ACTS, 9)
    k = routes.choose(timings(noisy, vision)).kernels
    assert k.bf16_packed_lm and k.bf16_packed_vision
    loses = noisy | {"bf16 packed": [5, 12, 12, 12, 12, 12]}  # wins at one row only
    assert not routes.choose(timings(loses, vision)).kernels.bf16_packed_lm


def test_widening_must_win_at_every_larger_row_count():
    """A route that wins at one row count by noise but loses above it does not set the threshold."""
    t = timings(
        {n: [10, 10, 10, 10, 10, 10] for n in LM_NAMES} | {"int8 widened to fp32": [20, 5, 20, 5, 5, 5]},
        dict.fromkeys(VISION_NAMES, 1),
    )
    assert routes.choose(t).kernels.int8_lm == 16


def test_auto_is_the_fastest_route_that_quality_allows():
    avx2 = routes.choose(AVX2_LIKE)
    assert avx2.auto == "fp32"  # bf16 is emulated; bf16-fp32-sums and int8 fall short of bf16's top-1 agreement
    assert not avx2.allowed["int8"] and not avx2.allowed["bf16-fp32-sums"]
    assert avx2.caption_ms["int8"] < avx2.caption_ms["fp32"]  # faster, yet not picked
    amx = routes.choose(AMX_LIKE)
    assert amx.auto == "bf16" and amx.caption_ms["bf16"] < amx.caption_ms["fp32"]
    # faster than bf16, yet its top-1 agreement with fp32 falls short of bf16's: never auto
    assert amx.caption_ms["int8-activations"] < amx.caption_ms["bf16"] and not amx.allowed["int8-activations"]


def test_int8_is_the_route_with_the_faster_caption():
    """If this fails, `dtype="int8"` quantizes activations on a CPU without a fast int8 GEMM (AVX2: about 1% of
    fp32's speed), or where that makes a caption slower than int8 weights alone, or misses it where it is faster."""
    assert not routes.choose(AVX2_LIKE).kernels.int8_activations
    amx = routes.choose(AMX_LIKE)
    assert amx.kernels.int8_activations and amx.caption_ms["int8-activations"] < amx.caption_ms["int8+bf16-vision"]
    slow_images = {k: {r: dict(t) for r, t in v.items()} for k, v in AMX_LIKE.items()}
    slow_images["vision"][routes.VISION_ROWS].update(
        dict.fromkeys(routes.INT8_ACTS, 60)
    )  # bf16 takes 20: images cost more than
    r = routes.choose(slow_images)  # decoding saves
    assert not r.kernels.int8_activations
    assert r.caption_ms["int8-activations"] > r.caption_ms["int8+bf16-vision"]


def test_int8_activations_take_prepacked_weights_where_they_win_overall():
    """If this fails, int8 activations multiply plain weights (oneDNN reorders each one at every call: a batch's
    decoding 1.8x slower on an AVX512-VNNI EPYC) where prepacked ones win over the row counts and an image, or
    take prepacked weights where those lose overall (a CPU whose oneDNN int8 kernels differ), or on AVX2."""
    assert not routes.choose(AVX2_LIKE).kernels.int8_packed
    amx = routes.choose(AMX_LIKE)
    assert amx.kernels.int8_activations and amx.kernels.int8_packed  # slower at one row, faster in total
    loses = {k: {r: dict(t) for r, t in v.items()} for k, v in AMX_LIKE.items()}
    for t in loses["lm"].values():
        t["int8 activations packed"] = t["int8 activations"] + 1
    assert not routes.choose(loses).kernels.int8_packed


def test_quality_gate_is_transformers_bf16_top1():
    assert allowed("fp32") and allowed(YARDSTICK)
    assert not allowed("a route nobody measured")
    better = {**QUALITY, "int8": {**QUALITY["int8"], "top1_agreement": QUALITY[YARDSTICK]["top1_agreement"]}}
    assert allowed("int8", better) and not allowed("int8")
    assert not allowed("int8-activations")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measured mode with a fake stopwatch (counts its calls) and the cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BLIP2_CPU_BF16", raising=False)
    monkeypatch.setenv(routes.ROUTES_ENV, "measure")
    monkeypatch.setattr(routes, "_memo", {})
    calls = []
    monkeypatch.setattr(routes, "measure", lambda: calls.append(1) or AVX2_LIKE)
    yield calls
    quant.use_kernels(quant.Kernels())


def test_cache_is_written_keyed_by_machine_and_reused(measured, monkeypatch):
    first = routes.measured_routes()
    path = routes.cache_path(routes.machine_key())
    assert path.is_file() and path.name.startswith("routes-") and "measured" in first.source
    again = routes.measured_routes()
    assert len(measured) == 1 and again.source == f"cache {path}" and again.kernels == first.kernels
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: another file, measured anew
    assert routes.cache_path(routes.machine_key()) != path
    routes.measured_routes()
    assert len(measured) == 2
    assert json.loads(path.read_text())["key"]["cores"] is not None


def test_cache_of_a_cpu_with_other_flags_is_not_reused(measured, monkeypatch):
    # Cloud machines named "AMD EPYC" come with and without AVX-512: a cache folder shared between them (a home
    # directory on NFS) must not hand one machine's timings to the other, or auto picks bf16 where it is emulated
    avx2, avx512 = ["avx2", "fma", "f16c"], ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"]
    for flags in (avx2, avx512, avx2):
        monkeypatch.setattr(machine, "cpu_flags", lambda f=flags: f)
        routes.measured_routes()
    assert len(measured) == 2  # the AVX-512 machine measured its own; the AVX2 one found its cache again
    assert json.loads(routes.cache_path(routes.machine_key()).read_text())["key"]["flags"] == avx2


@pytest.mark.parametrize("damage", ["{not json", '{"key": {}, "timings_ms": {}}', "[]"])
def test_corrupt_cache_is_measured_again_with_a_warning_naming_it(measured, damage):
    path = routes.cache_path(routes.machine_key())
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    with pytest.warns(routes.RouteCacheWarning, match=str(path)):
        r = routes.measured_routes()
    assert len(measured) == 1 and r.kernels == routes.choose(AVX2_LIKE).kernels
    assert json.loads(path.read_text())["timings_ms"]  # rewritten whole


def test_recalibrate_measures_even_with_a_cache(measured):
    routes.measured_routes()
    routes.measured_routes(recalibrate=True)
    assert len(measured) == 2


def test_loads_use_the_measured_kernels(measured, opt_ckpt):
    import blip2

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    m = blip2.load(opt_ckpt, device="cpu", dtype="int8")
    lm = [mod for mod in m.model.language_model.modules() if isinstance(mod, Int8Linear)]
    assert lm and all(mod.min_positions == 16 for mod in lm)
    b = blip2.load(opt_ckpt, device="cpu", dtype="bf16")
    vis = [mod for mod in b.model.vision_model.modules() if isinstance(mod, StoredLinear)]
    assert vis and all(mod.min_positions == 0 for mod in vis)
    assert len(measured) == 1  # once per process


@pytest.mark.parametrize(("env", "value", "auto"), [("BLIP2_CPU_BF16", "1", "bf16"), ("BLIP2_CPU_BF16", "0", "fp32")])
def test_environment_overrides_skip_the_measurement(measured, monkeypatch, env, value, auto):
    monkeypatch.setenv(env, value)
    r = routes.cpu_routes()
    assert measured == [] and r.auto == auto and r.source == f"{env}={value}"
    assert placement("cpu", "bf16").bf16_sums_in_fp32 is (value == "0")


@pytest.mark.parametrize(("value", "table"), [("0", AMX_LIKE), ("1", AMX_LIKE), ("packed", AVX2_LIKE)])
def test_int8_activations_variable_overrides_the_measurement(measured, monkeypatch, value, table):
    """If this fails, a user cannot choose the more accurate weight-only int8 on a CPU measured to prefer int8
    activations, or plain weights where prepacked ones were measured faster (or try int8 activations, with prepacked
    weights, elsewhere)."""
    monkeypatch.setattr(routes, "measure", lambda: measured.append(1) or table)
    monkeypatch.setenv(routes.INT8_ACTIVATIONS_ENV, value)
    r = routes.cpu_routes()
    assert r.kernels.int8_activations is (value != "0") and r.source.endswith(f"BLIP2_INT8_ACTIVATIONS={value}")
    assert r.kernels.int8_packed is (value == "packed")  # measured faster on AMX_LIKE, but forced off or on
    monkeypatch.setenv(routes.INT8_ACTIVATIONS_ENV, "yes")
    with pytest.raises(ConfigError, match="BLIP2_INT8_ACTIVATIONS='yes': expected 0, 1 or packed"):
        routes.cpu_routes()


@pytest.mark.parametrize(("value", "table"), [("torch", AMX_LIKE), ("bf16", AVX2_LIKE)])
def test_int4_kernel_variable_overrides_the_measurement(measured, monkeypatch, value, table):
    """If this fails, a user (or bench/quality.py, which pins each route's arithmetic) cannot choose which int4
    kernel `dtype="int4"` decodes on, or a misspelt choice passes silently."""
    monkeypatch.setattr(routes, "measure", lambda: measured.append(1) or table)
    monkeypatch.setenv(routes.INT4_KERNEL_ENV, value)
    r = routes.cpu_routes()
    assert r.kernels.int4_kernel == value and r.source.endswith(f"BLIP2_INT4_KERNEL={value}")
    assert routes.choose(table).kernels.int4_kernel != value  # the measurement chose the other
    monkeypatch.setenv(routes.INT4_KERNEL_ENV, "fast")
    with pytest.raises(ConfigError, match="BLIP2_INT4_KERNEL='fast': expected torch or bf16"):
        routes.cpu_routes()


def test_bad_routes_variable_is_a_clear_error(measured, monkeypatch):
    monkeypatch.setenv(routes.ROUTES_ENV, "fastest")
    with pytest.raises(ConfigError, match="BLIP2_ROUTES='fastest': expected measure or flags"):
        placement("cpu", "int8")
