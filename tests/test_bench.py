"""The trainer benchmark runs end to end (its numbers are for the README; here only that it works)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_throughput_prints_both_loops_their_ratio_and_the_caching_ceiling():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--steps", "5", "--batch", "2"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "diffusers-style reference" in out and "cnkit Trainer" in out
    ratio = float(re.search(r"speed-up \(samples/s, cnkit / reference\): ([\d.]+)x", out).group(1))
    enc, ref, ceiling = map(float, re.search(
        r"encoder part: ([\d.]+) s of its ([\d.]+) s step .*gives at most ([\d.]+)x", out).groups())
    assert ratio > 0 and 0 < enc < ref
    assert abs(ceiling - ref / (ref - enc)) < 0.05 * ceiling  # from the two times it prints, rounded
