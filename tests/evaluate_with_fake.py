"""Launcher for `accelerate launch` test subprocesses: `emerdiff evaluate` with the fake segmenter.

The product has no hook that imports code named in the environment; a test that
needs the fake in another process runs this script instead of
``-m emerdiff.cli.evaluate`` (same arguments).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_evaluate import fake_segment  # noqa: E402

from emerdiff.cli.evaluate import build_parser, run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(build_parser().parse_args(), segment_fn=fake_segment))
