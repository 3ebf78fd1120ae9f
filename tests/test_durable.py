"""The durable-run toolkit: atomic files, torn JSONL repair, settings fingerprints, folder swaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blip2 import durable
from blip2.errors import ConfigError

SRC = str(Path(durable.__file__).resolve().parents[1])


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    durable.atomic_write(path, "one\n")
    durable.atomic_write(path, b"two\r\n")  # bytes as given, text as UTF-8 with "\n" kept
    durable.atomic_write(path, "drei ü\n")
    assert path.read_bytes() == "drei ü\n".encode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_kill_between_write_and_rename_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "caption.txt"
    path.write_text("old\n")
    script = f"""
        import os, signal, sys
        sys.path.insert(0, {SRC!r})
        from blip2 import durable
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # the kill comes just before the rename
        durable.atomic_write({str(path)!r}, "new\\n")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old\n"
    temp = durable.temp_path(path)
    assert temp.read_text() == "new\n"  # written and fsynced, never renamed
    durable.atomic_write(path, "newer\n")  # the rerun writes over the leftover temp file
    assert path.read_text() == "newer\n" and not temp.exists()


def test_error_before_the_rename_removes_the_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{}")
    with pytest.raises(RuntimeError), durable.atomic_path(path) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("writer failed")
    assert path.read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["r.json"]


def test_unique_temp_names_are_per_process(tmp_path: Path) -> None:
    path = tmp_path / "db.emb"
    assert durable.temp_path(path, unique=True).name == f".db.emb.{os.getpid()}{durable.TEMP_SUFFIX}"
    assert durable.temp_path(path).name == f".db.emb{durable.TEMP_SUFFIX}"
    with durable.atomic_path(path, fsync=False, unique=True) as tmp:
        tmp.write_bytes(b"cache")
    assert path.read_bytes() == b"cache"


def test_torn_jsonl_line_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    durable.append_jsonl(path, [{"path": "a", "n": 1}, {"path": "b", "n": "ü"}])
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"path": "c", "n"')  # killed while writing the third line
    assert durable.repair_jsonl(path) == [{"path": "a", "n": 1}, {"path": "b", "n": "ü"}]
    assert path.read_bytes() == whole
    durable.append_jsonl(path, [{"path": "c"}])  # appends start on a fresh line
    assert [r["path"] for r in durable.repair_jsonl(path)] == ["a", "b", "c"]


def test_repair_cuts_from_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"path": "a"}\n\x00\x00\x00\n{"path": "b"}\n')  # zeros a power cut can leave
    assert durable.repair_jsonl(path) == [{"path": "a"}] and path.read_bytes() == b'{"path": "a"}\n'
    path.write_bytes(b'{"path": "a"}\n{"other": 1}\n')
    assert durable.repair_jsonl(path, lambda r: "path" in r) == [{"path": "a"}]
    assert path.read_bytes() == b'{"path": "a"}\n'
    assert durable.repair_jsonl(tmp_path / "none.jsonl") == []


def test_append_nothing_creates_no_file(tmp_path: Path) -> None:
    durable.append_jsonl(tmp_path / "e.jsonl", [])
    assert not (tmp_path / "e.jsonl").exists()


def test_fingerprint_mismatch_names_the_differing_settings(tmp_path: Path) -> None:
    stored = {"model": "m", "options": {"num_beams": 5}, "size": (224, 224), "prompt": ""}
    same = {"prompt": "", "size": [224, 224], "options": {"num_beams": 5}, "model": "m"}  # order, tuple vs list
    durable.check_settings(stored, same, tmp_path / "run", "start over")
    assert durable.settings_hash(stored) == durable.settings_hash(same)
    assert durable.canonical(stored) == durable.canonical(same)
    other = {**same, "prompt": "a photo of", "seed": 1}
    with pytest.raises(ConfigError) as e:
        durable.check_settings(stored, other, tmp_path / "run", "use another --out")
    message = str(e.value)
    assert str(tmp_path / "run") in message and "use another --out" in message
    assert "prompt: '' -> 'a photo of'" in message and "seed: None -> 1" in message
    assert "model" not in message and "options" not in message
    assert durable.settings_diff(stored, other) == {"prompt": ("", "a photo of"), "seed": (None, 1)}
    assert durable.settings_hash(stored) != durable.settings_hash(other)
    assert len(durable.settings_hash(stored)) == 16


def test_replace_dir_and_recovery_after_a_kill_between_renames(tmp_path: Path) -> None:
    ckpt, tmp = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps({"step": 1}))
    durable.replace_dir(tmp, ckpt)
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 1} and not tmp.exists()
    # the next save was killed after checkpoint -> checkpoint.old, before checkpoint.tmp -> checkpoint
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps({"step": 2}))
    ckpt.rename(tmp_path / "checkpoint.old")
    durable.recover_dir(ckpt, tmp)
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    # killed after the swap, before the old folder was removed
    (tmp_path / "checkpoint.old").mkdir()
    durable.recover_dir(ckpt, tmp)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
