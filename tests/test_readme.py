"""The README's training loop runs as written, and the bits-per-byte it logs is the exact ratio."""
import math
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _training_loop_code() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- training-loop -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its <!-- training-loop --> python block"
    return m.group(1)


def test_readme_training_loop_runs_and_logs_exact_bpb(assets):
    code = _training_loop_code()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"loss (\S+) nats/token\s+bpb (\S+)\s+n_bytes (\d+)", out.stdout)
    assert len(rows) == 12
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 20
    import tiktoken
    first = tiktoken.get_encoding("gpt2").encode(text)[0]
    n_bytes_ref = len(text.encode("utf-8")) - len(tiktoken.get_encoding("gpt2").decode_single_token_bytes(first))
    n_tokens = len(tiktoken.get_encoding("gpt2").encode(text)) - 1
    for loss, bpb, n_bytes in rows:
        assert int(n_bytes) == n_bytes_ref
        assert float(bpb) == __import__("pytest").approx(float(loss) * n_tokens / (math.log(2) * n_bytes_ref), rel=2e-3)
    assert float(rows[-1][1]) < 0.5 * float(rows[0][1])  # it learns
