"""Coverage-guided fuzzing of the frame decoder and the codec with atheris (libFuzzer).

    pip install atheris                      # into the project's venv
    python scripts/fuzz_frames.py -runs=1000000 -rss_limit_mb=1024
    python scripts/fuzz_frames.py -max_total_time=600 corpus_dir/

The target feeds the input to a FrameDecoder in pieces (the first byte chooses how it is cut) and
decodes every message it holds; half the time the rest of the input is one frame body, so the
fuzzer reaches the codec's field checks at once. Only ProtocolError (FrameError included) may
come out; anything else is a crash libFuzzer reports with the input that caused it. The seed
corpus is real traffic: every kind of frame a short in-process session sends (the same corpus
tests/test_fuzz_framing.py uses), written to a temporary directory unless one is given.

Without atheris installed it says so and exits 2; tests/test_fuzz_framing.py covers the same
ground with hypothesis.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:
    import atheris  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the machine
    print("atheris is not installed (pip install atheris): use tests/test_fuzz_framing.py", file=sys.stderr)
    sys.exit(2)

with atheris.instrument_imports():
    from shared.protocol.codec import ProtocolError
    from shared.protocol.framing import FrameDecoder, FrameError

STATS = {"inputs": 0, "messages": 0, "protocol_errors": 0, "frame_errors": 0}


def target(data: bytes) -> None:
    STATS["inputs"] += 1
    if STATS["inputs"] % 100_000 == 0:
        report()
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode & 1:
        # One frame around the rest: the body reaches msgpack and the codec directly.
        rest = len(rest).to_bytes(4, "big") + rest
    step = (mode >> 1) + 1  # piece size 1..128
    decoder = FrameDecoder()
    for i in range(0, len(rest), step):
        try:
            decoder.feed(rest[i : i + step])
        except FrameError:
            STATS["frame_errors"] += 1
            return
        while True:
            try:
                msg = decoder.next_message()
            except FrameError:
                STATS["frame_errors"] += 1
                return
            except ProtocolError:
                STATS["protocol_errors"] += 1
                continue
            if msg is None:
                break
            STATS["messages"] += 1


START = [time.perf_counter()]


def report() -> None:
    """Figures so far (libFuzzer itself reports a crash, with the input, and stops)."""
    secs = time.perf_counter() - START[0]
    print(
        f"#fuzz_frames inputs {STATS['inputs']} in {secs:.0f} s ({STATS['inputs'] / max(secs, 1e-9):.0f}/s): "
        f"{STATS['messages']} messages decoded, {STATS['protocol_errors']} protocol errors, "
        f"{STATS['frame_errors']} frame errors, no other exception",
        file=sys.stderr,
        flush=True,
    )


def seed_corpus(directory: str) -> int:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_fuzz_framing import CORPUS  # type: ignore[import-not-found]

    for i, frame in enumerate(CORPUS):
        with open(os.path.join(directory, f"seed-{i:03d}"), "wb") as f:
            f.write(b"\x00" + frame)  # mode 0: the frame as a stream, fed a byte at a time
    return len(CORPUS)


def main() -> None:
    args = [a for a in sys.argv[1:]]
    dirs = [a for a in args if not a.startswith("-")]
    if not dirs:
        tmp = tempfile.mkdtemp(prefix="fuzz-frames-")
        n = seed_corpus(tmp)
        print(f"seed corpus: {n} real frames in {tmp}", file=sys.stderr)
        args.append(tmp)
    START[0] = time.perf_counter()
    atheris.Setup([sys.argv[0], *args], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
