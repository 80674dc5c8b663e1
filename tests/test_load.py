"""Load: 50 concurrent clients mixing text search, image upload and thumbnails against the
real `clipdex serve`, with zero errors (bench/bench_load.py, shortened to 20 s here).

The benchmark runs as its own process, exactly as a person runs it: it indexes real photos
with `clipdex index`, starts `clipdex serve` on the ONNX backend with the random-weights
MobileCLIP-S2 checkpoint, and reports every answer that was not a 200.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fifty_clients_for_twenty_seconds_without_an_error(spread_checkpoint):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_load.py"), "--clients", "50",
         "--seconds", "20", "--weights", str(spread_checkpoint), "--json"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kinds = report["kinds"]
    assert kinds["all"]["errors"] == 0, report["error_samples"]
    assert report["server_log_errors"] == 0
    for kind in ("text (new)", "text (repeat)", "image upload", "thumbnail"):
        assert kinds[kind]["n"] > 0, (kind, kinds)
    assert done.returncode == 0, done.stderr[-3000:]
