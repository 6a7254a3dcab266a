"""Compare tokenizers on corpora: tokens, bytes/token, chars/token, tokens/word, vocabulary used.

    python scripts/compare_tokenizers.py --tokenizers gpt2,cl100k_base --dataset wikitext   # = lmloss compare-tokenizers

The command lives in lmloss/cli_compare.py (installed as `lmloss compare-tokenizers`); this file
keeps the documented script working from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmloss.cli_compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
