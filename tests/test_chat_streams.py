"""`blip2 chat` prints an answer's words as they are generated, read from a real subprocess's stdout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blip2
from blip2.streaming import stable_prefix

TESTS = Path(__file__).resolve().parent
# Runs `blip2 chat` with the model's language model paused after PAUSE steps until a byte arrives on fd GATE.
SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from step_gate import StepGate
import blip2.pipeline as p
real = p.load
def load(*a, **k):
    m = real(*a, **k)
    gate = StepGate(m.model.language_model, wait=lambda: os.read({gate}, 1))
    gate.pause_after({pause})
    return m
p.load = load
from blip2.cli import main
main(sys.argv[1:], prog_name="blip2")
"""


def test_chat_prints_words_before_the_answer_ends(opt_ckpt: Path, images) -> None:
    """Otherwise `blip2 chat` would sit silent until each whole answer is done."""
    m = blip2.load(opt_ckpt, device="cpu", dtype="fp32")
    chat = m.chat(images["l"])
    expected = chat.ask("what is the dog doing?", max_new_tokens=60)
    pause = len(chat.last.tokens) // 2
    assert stable_prefix(m.text(chat.last.tokens[:pause])), "the fixture's answer has no word boundary early enough"
    gate_r, gate_w = os.pipe()
    cmd = [sys.executable, "-c", SCRIPT.format(tests=str(TESTS), gate=gate_r, pause=pause), "chat"]
    cmd += ["--model", str(opt_ckpt), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "60", str(images["l"])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(gate_r,), env=env)
    try:
        proc.stdin.write(b"what is the dog doing?\n")
        proc.stdin.flush()
        partial = os.read(proc.stdout.fileno(), 4096).decode()  # blocks until the first words are printed
        # The answer cannot end before the gate gets its byte: these words came before the end.
        assert partial and b"\n" not in partial.encode() and expected.startswith(partial) and partial != expected
        os.write(gate_w, b"x")
        proc.stdin.close()
        rest = proc.stdout.read().decode()
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(gate_w)
        if proc.poll() is None:
            proc.kill()
    assert (partial + rest).splitlines()[0] == expected
