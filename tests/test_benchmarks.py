"""The benchmarks run and print what they promise (their structure and sanity; timings are never asserted)."""

import itertools
import math
import re
import subprocess

from helpers import OFFLINE, PYTHON, ROOT


def table(text: str, header: str) -> dict:
    """The markdown table whose header row starts with `header`: first cell -> the other cells."""
    lines = text[text.index(f"| {header} |"):].splitlines()[2:]  # below the header and the |---| row
    rows = [line.strip("|").split("|") for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def test_train_step_benchmark_prints_every_phase_and_the_on_policy_check():
    proc = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "train_step.py"), "--model", "tiny", "--batch", "2",
                           "--num-steps", "3", "--matmul-size", "256"], cwd=ROOT, env=OFFLINE, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    phases = table(out, "phase")
    assert list(phases) == ["sampling", "decode", "reward", "training", "optimiser", "epoch"]
    seconds = {name: float(cells[0]) for name, cells in phases.items()}
    peaks = {name: float(cells[2]) for name, cells in phases.items()}
    assert all(math.isfinite(s) and s >= 0 for s in seconds.values()) and seconds["training"] > 0
    assert math.isclose(sum(seconds[p] for p in list(phases)[:-1]), seconds["epoch"], abs_tol=0.01)
    assert all(p > 0 for p in peaks.values()) and peaks["epoch"] == max(peaks.values())
    images_per_s = float(re.search(r"^images/s: (\S+)$", out, re.M).group(1))
    assert math.isfinite(images_per_s) and images_per_s > 0
    flops, rate, fraction, peak = re.search(r"^training: (\S+) TFLOP \(model, forward\+backward\), (\S+) TFLOP/s = (\S+)% "
                                            r"of the measured fp32 matmul peak (\S+) TFLOP/s$", out, re.M).groups()
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in (flops, rate, fraction, peak))
    assert math.isclose(float(rate) / float(peak) * 100, float(fraction), rel_tol=0.05, abs_tol=0.06)
    deviation = table(out, "precision")
    assert list(deviation) == ["fp32", "bf16", "fp16"]
    assert float(deviation["fp32"][0]) < 1e-5  # the on-policy check in float32
    for name in ("bf16", "fp16"):  # measured, or the reason it could not be, in one cell
        assert deviation[name][0].startswith("failed: ") or math.isfinite(float(deviation[name][0])), deviation[name]
