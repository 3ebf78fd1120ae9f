"""2,000 byte-level mutations of valid image files in 8 formats go through `load_image` in a child process with a
memory limit. If this fails, some damaged upload can crash the process (a segfault in a decoder, an exception other
than `ImageError` that a server answers with 500), hang a decoding worker, or exhaust memory; or a file that Pillow
itself decodes is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

CASES_PER_FORMAT = 250
FORMATS = ("rgb.png", "photo.jpg", "animated.gif", "lossy.webp", "lzw.tiff", "rgb.bmp", "sizes.ico", "layered.psd")
MEMORY_LIMIT = 3 << 30  # bytes of address space for the child: a bomb that slips through dies here, loudly
CASE_SECONDS = 10.0  # the slowest single decode allowed

CHILD = textwrap.dedent(
    """
    import json, random, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
    from image_corpus import corpus
    from blip2.errors import ImageError
    from blip2.images import _quiet, load_image  # _quiet: the oracle's own decoder noise is not under test
    from PIL import Image
    import io

    names, per_format = json.loads(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(1234)
    files = corpus()
    worst, refused_by_us_only, kinds = 0.0, [], {}

    def mutate(data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op, at = rng.random(), rng.randrange(len(data))
            if op < 0.4:
                data[at] = rng.randrange(256)                      # flip a byte
            elif op < 0.55:
                data[at:at + 4] = b"\\xff\\xff\\xff\\x7f"            # a huge number in a header field
            elif op < 0.7:
                del data[at:at + rng.randint(1, 64)]               # drop bytes
            elif op < 0.85:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # insert bytes
            else:
                data = data[:max(1, at)]                           # truncate
        return bytes(data)

    for name in names:
        original = files[name][0]()
        for case in range(per_format):
            data = mutate(original)
            start = time.perf_counter()
            try:
                load_image(data)
                kind = "image"
            except ImageError as e:
                kind = e.kind
            except BaseException as e:
                print(json.dumps({"crash": f"{name} case {case}: {type(e).__name__}: {e}"}))
                sys.exit(3)
            worst = max(worst, time.perf_counter() - start)
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind not in ("image", "too_large"):
                try:
                    with _quiet(), Image.open(io.BytesIO(data)) as im:
                        if im.size[0] * im.size[1] <= 4_000_000:
                            im.convert("RGB")
                            refused_by_us_only.append(f"{name} case {case}: {kind}")
                except Exception:
                    pass
    print(json.dumps({"worst_s": worst, "kinds": kinds, "refused_by_us_only": refused_by_us_only}))
    """
)


def test_two_thousand_mutated_files_never_crash_hang_or_blow_memory(tmp_path: Path) -> None:
    here = Path(__file__).parent
    script = tmp_path / "fuzz_child.py"
    script.write_text(CHILD)
    args = [sys.executable, str(script), str(here), str(MEMORY_LIMIT), json.dumps(FORMATS), str(CASES_PER_FORMAT)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=len(FORMATS) * CASES_PER_FORMAT * CASE_SECONDS)
    assert done.returncode == 0, f"the decoding process died (exit {done.returncode}): {done.stdout[-2000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(report["kinds"].values()) == len(FORMATS) * CASES_PER_FORMAT == 2000
    assert report["worst_s"] < CASE_SECONDS, report
    assert report["refused_by_us_only"] == [], report  # Pillow decodes them: so must we
    assert report["kinds"].get("image", 0) > 0 and len(report["kinds"]) > 2, report  # the mutations did bite
    assert done.stderr.strip() == "", done.stderr[-2000:]  # decoder noise never reaches the terminal
