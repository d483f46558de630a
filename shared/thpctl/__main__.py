"""``thpctl`` / ``python -m shared.thpctl``."""

from __future__ import annotations

import sys

import trio

from shared.thpctl.cli import EXIT_FAIL, amain


def main(argv: list[str] | None = None) -> int:
    try:
        return trio.run(amain, sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except Exception as exc:  # a bug in thpctl: still one line, never a traceback
        print(f"thpctl: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
