"""Evaluate a causal language model on a corpus: token, byte and word perplexity, bits per byte.

    python scripts/eval.py --model gpt2 --dataset wikitext       # the same as: lmloss eval ...

The command lives in lmloss/cli_eval.py (installed as `lmloss eval`); this file keeps the
documented `python scripts/eval.py` working from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmloss.cli_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
