"""The `blip2` command line: caption, ask, chat, models.

The tiny random checkpoints write gibberish, so every test compares the command's output with what the Python API
gives on the same model and images; a mismatch means the CLI changed the answer a user would get.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import blip2
from blip2.cli import main
from blip2.cli.options import one_line
from blip2.config import KNOWN_MODELS


@pytest.fixture(scope="module")
def api(opt_ckpt: Path) -> blip2.Blip2:
    return blip2.load(opt_ckpt, dtype="fp32")


def run(*args: object, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], input=input, env=env)


def model_args(ckpt: Path) -> list[str]:
    return ["--model", str(ckpt), "--dtype", "fp32"]


def tsv(result: Result) -> list[tuple[str, str]]:
    return [tuple(line.split("\t", 1)) for line in result.stdout.splitlines()]  # type: ignore[misc]


def assert_clean_failure(result: Result, *names: str) -> None:
    """Exit 2, no traceback, and each name on exactly one stderr line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for name in names:
        assert sum(name in line for line in result.stderr.splitlines()) == 1, result.stderr


# ---- caption ---------------------------------------------------------------------------------------------------------
def test_caption_prints_same_captions_as_api_in_input_order(opt_ckpt, images, api):
    """Otherwise `blip2 caption a.jpg b.jpg` would print other captions than `m.caption([...])`, or mix up paths."""
    paths = [images[k] for k in ("rgb", "rgba", "l", "exif_rot", "large", "tiny")]
    result = run("caption", *model_args(opt_ckpt), "--batch-size", 4, *paths)
    assert result.exit_code == 0, result.output
    expected = [(str(p), one_line(t)) for p, t in zip(paths, api.caption(list(paths)), strict=True)]
    assert tsv(result) == expected
    assert result.stderr == ""


def test_caption_with_prompt_prints_the_api_continuation(opt_ckpt, images, api):
    """Otherwise `--prompt "a photo of"` would be ignored or give another continuation than the API."""
    result = run("caption", *model_args(opt_ckpt), "--prompt", "a photo of", images["rgb"], images["p"])
    assert result.exit_code == 0, result.output
    expected = api.caption([images["rgb"], images["p"]], prompt="a photo of")
    assert [text for _, text in tsv(result)] == [one_line(t) for t in expected]


def test_caption_json_lines_parse_and_keep_exact_text(opt_ckpt, images, api):
    """Otherwise a script reading `--json` output would hit invalid JSON or captions that differ from the API's."""
    paths = [images["rgb"], images["cmyk"]]
    result = run("caption", *model_args(opt_ckpt), "--json", *paths)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [{"image": str(p), "caption": t} for p, t in zip(paths, api.caption(paths), strict=True)]


@pytest.mark.parametrize("bad", ["missing", "empty", "truncated", "not_image"])
def test_caption_bad_file_is_one_stderr_line_and_good_images_still_captioned(opt_ckpt, images, api, tmp_path, bad):
    """Otherwise one broken file would crash the run with a traceback, or silently vanish with exit code 0."""
    bad_path = tmp_path / "missing.jpg" if bad == "missing" else images[bad]
    good = [images["rgb"], images["l"]]
    result = run("caption", *model_args(opt_ckpt), "--batch-size", 2, good[0], bad_path, good[1])
    assert_clean_failure(result, str(bad_path))
    assert tsv(result) == [(str(p), one_line(t)) for p, t in zip(good, api.caption(good), strict=True)]
    errors = [line for line in result.stderr.splitlines() if str(bad_path) in line]
    assert errors[0].startswith("error: ")


def test_caption_every_image_bad_exits_2_without_loading_output(opt_ckpt, images):
    """Otherwise a run where nothing could be read would look like success to a script."""
    result = run("caption", *model_args(opt_ckpt), images["empty"], images["not_image"])
    assert_clean_failure(result, str(images["empty"]), str(images["not_image"]))
    assert result.stdout == ""


@pytest.mark.parametrize("name, content", [("notes.jpg", "my notes"), ("notes.txt", "these are my notes\n")])
def test_one_bad_file_is_exactly_one_line(opt_ckpt, tmp_path, name, content):
    """Otherwise `blip2 caption notes.txt` (a list file that names no image) or a text file named .jpg would print
    a summary and more errors after the one line that says what is wrong."""
    bad = tmp_path / name
    bad.write_text(content)
    result = run("caption", *model_args(opt_ckpt), bad)
    assert_clean_failure(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], result.stderr
    assert result.stdout == ""


def test_caption_on_t5_checkpoint_equals_api(t5_ckpt, images):
    """Otherwise Flan-T5 checkpoints would caption differently from the API on the command line."""
    paths = [images["rgb"], images["rgba"]]
    result = run("caption", *model_args(t5_ckpt), *paths)
    assert result.exit_code == 0, result.output
    expected = blip2.load(t5_ckpt, dtype="fp32").caption(paths)
    assert tsv(result) == [(str(p), one_line(t)) for p, t in zip(paths, expected, strict=True)]


# ---- generation options ----------------------------------------------------------------------------------------------
def test_num_beams_reaches_the_model(opt_ckpt, images, api):
    """Otherwise `--num-beams 3` would be silently ignored and users would get greedy captions."""
    result = run("caption", *model_args(opt_ckpt), "--num-beams", 3, "--max-new-tokens", 8, images["rgb"])
    assert result.exit_code == 0, result.output
    assert tsv(result)[0][1] == one_line(api.caption(images["rgb"], num_beams=3, max_new_tokens=8))


def test_sampling_options_and_seed_reach_the_model(opt_ckpt, images, api):
    """Otherwise `--do-sample --seed` would not reproduce the API's sampled caption."""
    opts = ["--do-sample", "--top-p", 0.9, "--temperature", 0.7, "--seed", 3, "--repetition-penalty", 1.3]
    result = run("caption", *model_args(opt_ckpt), *opts, images["rgb"])
    assert result.exit_code == 0, result.output
    expected = api.caption(images["rgb"], do_sample=True, top_p=0.9, temperature=0.7, seed=3, repetition_penalty=1.3)
    assert tsv(result)[0][1] == one_line(expected)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--num-beams", "0"], "--num-beams"),
        (["--top-p", "0"], "--top-p"),
        (["--min-new-tokens", "9", "--max-new-tokens", "3"], "--min-new-tokens"),
    ],
)
def test_bad_generation_option_exits_2_naming_it(opt_ckpt, images, args, option):
    """Otherwise a bad option would give a traceback deep in generation, or not say which option was wrong."""
    result = run("caption", *model_args(opt_ckpt), *args, images["rgb"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert option in result.stderr
    assert result.stdout == ""


# ---- ask -------------------------------------------------------------------------------------------------------------
def test_ask_prints_the_api_answer(opt_ckpt, images, api):
    """Otherwise `blip2 ask` would answer differently from `m.ask` (e.g. without the VQA template or its defaults)."""
    result = run("ask", *model_args(opt_ckpt), images["rgb"], "what is it?")
    assert result.exit_code == 0, result.output
    assert result.stdout == api.ask(images["rgb"], "what is it?") + "\n"


def test_ask_json_and_options(opt_ckpt, images, api):
    """Otherwise `ask --json` would not parse, or `--max-new-tokens` would not reach the VQA generation."""
    result = run("ask", *model_args(opt_ckpt), "--json", "--max-new-tokens", 4, images["l"], "what color is the cat?")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    expected = api.ask(images["l"], "what color is the cat?", max_new_tokens=4)
    assert row == {"image": str(images["l"]), "question": "what color is the cat?", "answer": expected}


def test_ask_bad_image_is_one_line(opt_ckpt, images):
    """Otherwise asking about a corrupt file would print a traceback."""
    result = run("ask", *model_args(opt_ckpt), images["truncated"], "what is it?")
    assert_clean_failure(result, str(images["truncated"]))


# ---- chat ------------------------------------------------------------------------------------------------------------
def test_chat_session_answers_like_api_chat(opt_ckpt, images, api):
    """Otherwise a piped chat would lose its history, ignore /image or /reset, or hang at EOF."""
    script = f"what is it?\n/image {images['rgba']}\nwhat now?\n\nand then?\n/reset\nwhat now?\n"
    result = run("chat", *model_args(opt_ckpt), images["rgb"], input=script)
    assert result.exit_code == 0, result.output
    c = api.chat(images["rgb"])
    expected = [c.ask("what is it?")]
    c.set_image(images["rgba"])
    expected += [c.ask("what now?"), c.ask("and then?")]
    c.reset()
    expected.append(c.ask("what now?"))
    assert result.stdout.splitlines() == [one_line(a) for a in expected]
    assert "> " not in result.stdout  # no prompt when stdin is not a terminal
    assert result.stderr == ""


def test_chat_bad_image_command_reports_and_continues(opt_ckpt, images, api, tmp_path):
    """Otherwise a typo in `/image PATH` would end the conversation (or lose its history)."""
    missing = tmp_path / "nope.png"
    script = f"what is it?\n/image {missing}\n/image {images['not_image']}\n/frobnicate\nand then?\n/quit\nignored\n"
    result = run("chat", *model_args(opt_ckpt), images["rgb"], input=script)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    c = api.chat(images["rgb"])
    assert result.stdout.splitlines() == [one_line(c.ask("what is it?")), one_line(c.ask("and then?"))]
    assert len(result.stderr.splitlines()) == 3
    assert str(missing) in result.stderr and str(images["not_image"]) in result.stderr
    assert "/frobnicate" in result.stderr


def test_chat_with_bad_first_image_exits_2(opt_ckpt, images):
    """Otherwise `blip2 chat broken.jpg` would crash with a traceback or wait for questions about nothing."""
    result = run("chat", *model_args(opt_ckpt), images["empty"], input="what is it?\n")
    assert_clean_failure(result, str(images["empty"]))


# ---- models and loading errors ---------------------------------------------------------------------------------------
def test_models_lists_known_checkpoints(tmp_path):
    """Otherwise users could not find the model ids to pass to --model (even with no Hugging Face cache yet)."""
    result = run("models", env={"HF_HUB_CACHE": str(tmp_path / "no-cache")})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "LM"]
    row = next(line for line in lines if line.startswith("Salesforce/blip2-opt-2.7b "))
    assert row.split()[-1] == "no"
    assert sum(line.startswith("Salesforce/") for line in lines) == len(KNOWN_MODELS)


def test_missing_model_folder_is_one_line(images, tmp_path):
    """Otherwise a typo in --model would print a traceback instead of saying which folder is missing."""
    folder = tmp_path / "no-such-model"
    result = run("caption", "--model", folder, "--dtype", "fp32", images["rgb"])
    assert_clean_failure(result, str(folder))
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.splitlines()) == 1


def test_offline_hub_model_not_cached_is_one_line(images, tmp_path):
    """Otherwise offline users would get a huggingface_hub traceback instead of how to get the model."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = run("ask", "--model", "Salesforce/blip2-opt-2.7b", "--dtype", "fp32", images["rgb"], "hi?", env=env)
    assert_clean_failure(result, "Salesforce/blip2-opt-2.7b")
    assert len(result.stderr.splitlines()) == 1
    assert "not on disk" in result.stderr


def test_model_from_environment_variable(opt_ckpt, images, api):
    """Otherwise BLIP2_MODEL would be ignored and every command would try to fetch the 15 GB default model."""
    result = run("caption", "--dtype", "fp32", images["rgb"], env={"BLIP2_MODEL": str(opt_ckpt)})
    assert result.exit_code == 0, result.output
    assert tsv(result)[0][1] == one_line(api.caption(images["rgb"]))


def test_kv_cache_option_reaches_the_model_and_is_checked(opt_ckpt, images):
    """Otherwise --kv-cache would be ignored (a batch sized for an int8 cache would not fit) or a cache wider than
    the model's arithmetic would load without a word; and the setting would leak into the next command."""
    narrow = blip2.load(opt_ckpt, dtype="fp32", kv_cache="int8")
    before = os.environ.get("BLIP2_KV_CACHE")
    result = run("caption", *model_args(opt_ckpt), "--kv-cache", "int8", images["rgba"], images["rgb"])
    assert result.exit_code == 0, result.output
    assert [caption for _, caption in tsv(result)] == [one_line(narrow.caption(images[k])) for k in ("rgba", "rgb")]
    assert os.environ.get("BLIP2_KV_CACHE") == before
    wider = run("caption", "--model", opt_ckpt, "--dtype", "bf16", "--kv-cache", "fp32", images["rgb"])
    assert_clean_failure(wider, "kv_cache 'fp32'")


# ---- the installed entry point -----------------------------------------------------------------------------------
def test_python_dash_m_blip2_caption_runs(opt_ckpt, images, api):
    """Otherwise `python -m blip2` (and so the `blip2` script) would be broken even though CliRunner passes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "blip2", "caption", *model_args(opt_ckpt), str(images["rgb"]), str(images["empty"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == f"{images['rgb']}\t{one_line(api.caption(images['rgb']))}\n"
    assert str(images["empty"]) in proc.stderr


# ---- one meaning per short flag, one place per default ---------------------------------------------------------------
def _leaf_commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_each_short_flag_means_one_thing_in_every_command():
    """Otherwise a flag learnt on one command does something else on another (`-q` was --question in `caption`
    and --quiet in `index`)."""
    meanings: dict[str, set[str]] = {}
    for _path, command in _leaf_commands(main):
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in (*param.opts, *param.secondary_opts):
                    if len(opt) == 2 and opt[0] == "-" and opt[1] != "-":
                        meanings.setdefault(opt, set()).add(param.name)
    assert {flag: names for flag, names in meanings.items() if len(names) > 1} == {}
    assert meanings["-q"] == {"question"}


def _signature_default(function: object, name: str) -> object:
    return inspect.signature(function).parameters[name].default


def test_modules_that_still_copy_a_default_agree_with_blip2_defaults():
    """Every default shared by the API, the server and the CLI is defined in blip2.defaults. If this fails, a module
    that holds its own copy (instead of importing it) has drifted: the CLI's help and the API would disagree."""
    from blip2 import defaults as d
    from blip2.batch import BatchOptions
    from blip2.batch.ray_engine import RayRun
    from blip2.batch.sidecar import EXISTING
    from blip2.eval import run as eval_run
    from blip2.pipeline import VQA_OPTIONS, Blip2, Chat, GenerationOptions
    from blip2.processing import VQA_TEMPLATE
    from blip2.retrieval.build import index_images, index_images_ray
    from blip2.retrieval.search import search_text
    from blip2.server import openai
    from blip2.train import miniature

    assert {f.name: f.default for f in dataclasses.fields(GenerationOptions)} == dict(d.GENERATION)
    assert VQA_OPTIONS.max_new_tokens == d.VQA_MAX_NEW_TOKENS
    assert VQA_TEMPLATE == eval_run.VQA_PROMPT == d.VQA_TEMPLATE
    assert _signature_default(Blip2.chat, "context") == _signature_default(Chat, "context") == d.CONTEXT_TOKENS
    assert (openai.CONTEXT_TOKENS, openai.DEFAULT_MAX_TOKENS) == (d.CONTEXT_TOKENS, d.MAX_NEW_TOKENS)
    assert (eval_run.CAPTION_DEFAULTS, eval_run.VQA_DEFAULTS) == (d.EVAL_CAPTION, d.EVAL_VQA)
    assert _signature_default(eval_run.evaluate_caption, "batch_size") == d.EVAL_BATCH_SIZE
    assert _signature_default(eval_run.evaluate_vqa, "batch_size") == d.EVAL_BATCH_SIZE
    assert _signature_default(eval_run.evaluate_retrieval, "batch_size") == d.EVAL_RETRIEVAL_BATCH_SIZE
    assert _signature_default(eval_run.evaluate_retrieval, "k_test") == d.EVAL_K_TEST
    batch = {f.name: f.default for f in dataclasses.fields(BatchOptions)}
    assert (batch["ext"], batch["existing"], batch["separator"]) == (d.SIDECAR_EXT, "skip", d.SIDECAR_SEPARATOR)
    assert tuple(EXISTING) == d.SIDECAR_EXISTING and d.SIDECAR_EXISTING[0] == "skip"
    assert batch["max_pixels"] == d.MAX_PIXELS
    assert _signature_default(RayRun, "num_workers") == d.RAY_NUM_WORKERS
    assert _signature_default(RayRun, "shard_size") == d.RAY_SHARD_SIZE
    assert _signature_default(Blip2.generate, "batch_size") == d.BATCH_SIZE
    assert _signature_default(index_images, "batch_size") == _signature_default(index_images_ray, "batch_size")
    assert _signature_default(index_images, "batch_size") == d.BATCH_SIZE
    assert _signature_default(index_images_ray, "num_workers") == d.RAY_NUM_WORKERS
    assert _signature_default(search_text, "k") == d.TOP_K
    build_defaults = {p.name: p.default for p in miniature.build.params}
    demo_defaults = {p.name: p.default for p in miniature.demo_command.params}
    assert (build_defaults["work"], demo_defaults["folder"]) == (d.MINIATURE_WORK, d.MINIATURE_EXPORT)


def test_cli_defaults_are_blip2_defaults():
    """The options show and use the defaults of blip2.defaults, not copies (spot checks over every command)."""
    from blip2 import defaults as d

    def option(path: tuple[str, ...], name: str) -> click.Option:
        command = dict(_leaf_commands(main))[path]
        return next(p for p in command.params if p.name == name)

    assert option(("caption",), "model").default == d.DEFAULT_MODEL
    assert option(("index",), "model").default == option(("eval", "retrieval"), "model").default == d.RETRIEVAL_MODEL
    assert option(("caption",), "batch_size").default == option(("index",), "batch_size").default == d.BATCH_SIZE
    assert option(("caption",), "ext").default == d.SIDECAR_EXT
    assert option(("eval", "vqa"), "prompt").default == d.VQA_TEMPLATE
    assert option(("search",), "k").default == d.TOP_K
    assert option(("miniature", "build"), "work").default == d.MINIATURE_WORK
    assert f"[{d.EVAL_VQA['max_new_tokens']}]" in option(("eval", "vqa"), "max_new_tokens").help


# ---- the miniature: blip2 demo, blip2 miniature build ----------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "miniature"


def test_demo_runs_the_miniature_offline(monkeypatch):
    """`blip2 demo` is `make demo`: it must reach the miniature's demo with HF_HUB_OFFLINE=1 set for it."""
    from blip2.train import miniature

    seen: list[tuple[Path, str | None]] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(miniature, "demo", lambda folder, echo: seen.append((folder, os.environ.get("HF_HUB_OFFLINE"))))
    result = run("demo", EXAMPLE)
    assert result.exit_code == 0, result.output
    assert seen == [(EXAMPLE, "1")]


def test_demo_without_a_model_says_how_to_make_one(tmp_path):
    result = run("demo", tmp_path)
    assert result.exit_code == 2
    assert "blip2 miniature build" in result.stderr and str(tmp_path) in result.stderr


def test_miniature_build_runs_the_implementation_with_the_options(monkeypatch, tmp_path):
    """`blip2 miniature build` is `make miniature`: the options must reach train/miniature.py's build unchanged."""
    from blip2.train import miniature

    seen: list[dict] = []
    monkeypatch.setattr(miniature.build, "callback", lambda **kw: seen.append(kw))
    result = run("miniature", "build", "--work", tmp_path / "w", "--export", tmp_path / "e", "--quick")
    assert result.exit_code == 0, result.output
    assert seen == [{"work": str(tmp_path / "w"), "export_dir": str(tmp_path / "e"), "quick": True}]


def test_miniature_tower_runs_the_implementation_offline(monkeypatch, tmp_path):
    """`blip2 miniature tower` must reach train/miniature.py's second-tower phase, with its options and offline."""
    from blip2.train import miniature

    seen: list[tuple[dict, str | None]] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(
        miniature.tower_command, "callback", lambda **kw: seen.append((kw, os.environ.get("HF_HUB_OFFLINE")))
    )
    result = run("miniature", "tower", "--first", EXAMPLE, "--work", tmp_path / "w")
    assert result.exit_code == 0, result.output
    assert seen == [({"first": str(EXAMPLE), "work": str(tmp_path / "w")}, "1")]


def test_demo_needs_no_extra():
    """A core install (`pip install -e .`, no extras) must run `blip2 demo`: with every extra made unimportable,
    the miniature's modules import and its model loads and captions."""
    extras = ["accelerate", "webdataset", "tensorboard", "fastapi", "uvicorn", "ray", "faiss", "pycocoevalcap"]
    script = f"""
import sys
for name in {extras!r}:
    sys.modules[name] = None  # as if not installed
import blip2, blip2.train.miniature
m = blip2.load({str(EXAMPLE / "model")!r}, device="cpu", dtype="fp32")
print(m.caption({str(EXAMPLE / "images" / "test_0.png")!r}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
