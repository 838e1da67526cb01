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


def test_gpu_benchmark_runs_both_loops_on_a_cpu_at_a_tiny_size():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--tiny", "--size", "64", "--batches",
                          "2", "--steps", "3", "--warmup", "1", "--mixed-precision", "no"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = re.findall(r"^\| 2 \| (reference|cnkit) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out, flags=re.M)
    assert [r[0] for r in rows] == ["reference", "cnkit"], out
    for _, s, ips, _mem in rows:
        assert abs(float(ips) - 2 / float(s)) < 0.05 * float(ips) + 0.1  # images/s from the printed step time
    assert re.search(r"batch 2: cnkit / reference images per second [\d.]+x at [\d.]+x the memory", out)


def test_memory_benchmark_reports_growth_per_pair_and_the_fill50k_projection():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_memory.py"), "--n", "16", "--size", "64",
                          "--steps", "1", "--batch", "2"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert re.search(r"^\| 16 \| \d+ MB \|", out, flags=re.M) and re.search(r"^\| 128 \| \d+ MB \|", out, flags=re.M)
    assert "KB per pair; target: within 150 MB" in out and "Fill50K at 512 px on SD 1.5" in out
