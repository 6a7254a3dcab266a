"""lmloss: how wrong a language model is, exactly and fast.

This is the public API. Heavy optional dependencies (transformers, tiktoken, datasets, triton) are
imported inside the functions that need them, so `import lmloss` stays cheap in a training loop.
"""

from lmloss.metrics import LossTotals, bits_per_byte, perplexity
from lmloss.meter import LossMeter
from lmloss.ops import IMPLS, cross_entropy, logsumexp, token_nll
from lmloss.ops.linear import linear_cross_entropy, linear_token_nll
from lmloss.ops.vocab_parallel import vocab_parallel_token_nll
from lmloss.ops.stats import TokenStats, token_stats
from lmloss.ops.linear_stats import linear_token_stats
from lmloss.ops.kl import KLTokens, token_kl
from lmloss.tokenizers import Tokenizer, load_tokenizer, token_byte_lengths
from lmloss.encode import encode_document, encode_documents
from lmloss.data import Document, iter_corpus, load_corpus
from lmloss.windows import Window, plan_windows
from lmloss.models import load_model
from lmloss.evaluate import evaluate
from lmloss.results import EvalResult
from lmloss.compare import compare, kl_divergence, paired_bootstrap

__version__ = "0.1.0"

__all__ = [
    "IMPLS", "token_nll", "cross_entropy", "logsumexp",
    "linear_token_nll", "linear_cross_entropy", "vocab_parallel_token_nll",
    "TokenStats", "token_stats", "linear_token_stats", "KLTokens", "token_kl",
    "LossTotals", "LossMeter", "bits_per_byte", "perplexity",
    "Tokenizer", "load_tokenizer", "token_byte_lengths", "encode_document", "encode_documents",
    "Document", "load_corpus", "iter_corpus",
    "Window", "plan_windows",
    "load_model", "EvalResult", "evaluate",
    "compare", "kl_divergence", "paired_bootstrap",
    "__version__",
]
