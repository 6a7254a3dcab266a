"""Compare models on the same documents: KL divergence against a reference (same vocabulary), or
paired bits per byte of any models under any tokenizers.

    python scripts/compare_models.py --reference A --model B --dataset wikitext   # = lmloss compare-models ...
    python scripts/compare_models.py --models A,B,C --dataset wikitext

The command lives in lmloss/cli_compare_models.py (installed as `lmloss compare-models`); this file
keeps the documented script working from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmloss.cli_compare_models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
