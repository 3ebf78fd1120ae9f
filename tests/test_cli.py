"""The `blip2` command line: caption, ask, chat, models.

The tiny random checkpoints write gibberish, so every test compares the command's output with what the Python API
gives on the same model and images; a mismatch means the CLI changed the answer a user would get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import blip2
from blip2.cli import main
from blip2.cli.options import one_line


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
    assert sum(line.startswith("Salesforce/") for line in lines) == len(blip2.config.KNOWN_MODELS)


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
