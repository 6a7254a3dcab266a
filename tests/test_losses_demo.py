"""scripts/losses_demo.py prints the lesson's numbers; each is checked against a hand computation."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "losses_demo.py"


@pytest.fixture(scope="module")
def output() -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _number(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    assert match, f"{pattern!r} not in:\n{output}"
    return float(match.group(1))


def test_mse_and_softmax(output):
    assert _number(output, r"MSE\(\[2.1, 2.9, 5.0\], \[2, 3, 5\]\) = ([\d.]+)") == pytest.approx(0.02 / 3, abs=5e-6)
    probs = re.search(r"softmax\(\[3.0, 1.0, 0.5\]\) = \[([\d.]+), ([\d.]+), ([\d.]+)\]", output).groups()
    z = sum(math.exp(v) for v in (3.0, 1.0, 0.5))
    assert [float(p) for p in probs] == pytest.approx([math.exp(3) / z, math.exp(1) / z, math.exp(0.5) / z], abs=5e-4)
    assert [float(p) for p in probs] == [0.821, 0.111, 0.067]


def test_cross_entropy_values(output):
    z = sum(math.exp(v) for v in (3.0, 1.0, 0.5))
    assert _number(output, r"target 1 \(confidently wrong\): -ln p\[1\] = ([\d.]+)") == pytest.approx(
        -math.log(math.exp(1) / z), abs=5e-4)  # 2.197
    assert _number(output, r"target 0 \(right\): -ln p\[0\] = ([\d.]+)") == pytest.approx(
        -math.log(math.exp(3) / z), abs=5e-4)  # 0.197


def test_mse_gradient_fades_while_cross_entropy_does_not(output):
    rows = re.findall(r"^\s+(0\.\d+)\s+([\d.]+)\s+([\d.]+)$", output, flags=re.M)
    table = {float(p): (float(mse), float(ce)) for p, mse, ce in rows}
    assert sorted(table) == [0.001, 0.01, 0.1, 0.5, 0.9]
    for p, (mse_grad, ce_grad) in table.items():
        assert ce_grad == pytest.approx(1 - p, abs=1e-4)  # d CE / d z_correct = p - 1
    assert table[0.001][0] < 0.001 < table[0.5][0]  # MSE's gradient goes to 0 with p_correct
    assert table[0.001][1] > 0.99


def test_uniform_and_conversions(output):
    assert _number(output, r"CE = ln 50257 = ([\d.]+) nats/token") == pytest.approx(math.log(50257), abs=5e-4)
    assert _number(output, r"perplexity = (\d+)\n") == 50257
    assert _number(output, r"perplexity = exp\(CE\) = ([\d.]+)") == pytest.approx(math.exp(3.0), abs=5e-3)
    assert _number(output, r"\(ln 2 \* 4200\) = ([\d.]+)") == pytest.approx(3000 / (math.log(2) * 4200), abs=5e-5)
