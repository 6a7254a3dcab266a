"""Exact aggregation: sums only, divided once.

Every metric lmloss reports is a ratio of sums kept here:
    token_perplexity = exp(nll_nats / n_tokens)
    byte_perplexity  = exp(nll_nats / n_bytes)      = 2 ** bits_per_byte
    word_perplexity  = exp(nll_nats / n_words)
    bits_per_byte    = nll_nats / (ln 2 * n_bytes)
Never a mean of per-batch or per-document ratios.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["LossTotals", "bits_per_byte", "perplexity"]


_REAL = "a real number (a float, an int or a 0-d tensor)"
_WHOLE = "a whole number (an int, a whole float such as 3.0, or a 0-d integer tensor)"


def _as_number(value, name: str, expected: str) -> int | float:
    """A Python int or float from a real number, or from a one-element tensor or numpy array via
    .item() (on a CUDA tensor that synchronizes with the host). Bools, strings and the rest: TypeError."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        is_tensor = isinstance(value, torch.Tensor)
        if (value.numel() if is_tensor else value.size) != 1:
            raise ValueError(
                f"{name} must be one number (a summed total or a count, e.g. a 0-d tensor), got a "
                f"{type(value).__name__} of shape {tuple(value.shape)}; for per-token losses pass nll.sum() "
                "or use LossTotals.from_nll(nll)"
            )
        if (value.dtype == torch.bool) if is_tensor else (value.dtype.kind == "b"):
            raise TypeError(f"{name} must be {expected}, got a bool {type(value).__name__} {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.60}; "
                        "pass the number itself (convert a string with float() or int())")
    return value


def _as_nll(value, name: str = "nll_nats") -> float:
    """A summed NLL in nats as a float: finite and >= 0, as every sum of -log p is."""
    value = _as_number(value, name, _REAL)
    try:
        nll = float(value)
    except OverflowError:  # an int past float64's range
        nll = math.copysign(math.inf, value)
    _check_finite(nll, name)
    if nll < 0:
        raise ValueError(
            f"{name} must be >= 0 (a sum of -log p over scored tokens), got {nll!r}; pass the summed negative "
            "log-likelihood in nats (e.g. F.cross_entropy(..., reduction='sum')), not log-probabilities"
        )
    return nll


def _as_count(value, name: str) -> int:
    """A count as an int. 2.9, nan and inf raise ValueError (never truncated); bools and strings TypeError."""
    value = _as_number(value, name, _WHOLE)
    if isinstance(value, numbers.Integral) or (math.isfinite(value) and value == int(value)):
        return int(value)
    raise ValueError(f"{name} must be {_WHOLE}, got {value!r}; pass the count itself, not a mean "
                     "or a ratio (e.g. len(text.encode('utf-8')) bytes, or the number of scored tokens)")


def _check_finite(nll_nats: float, where: str = "") -> None:
    if not math.isfinite(nll_nats):
        src = f" in {where}" if where else ""
        raise ValueError(
            f"non-finite loss {nll_nats}{src}: a NaN or inf logit reached the totals. "
            "Check the model's logits (dtype overflow, NaN weights) before aggregating."
        )


def _exp(x: float) -> float:
    """math.exp, but inf (not OverflowError) past float64's range: a mean NLL over ~709.78 nats."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def bits_per_byte(nll_nats, n_bytes) -> float:
    """Bits per UTF-8 byte: nll_nats / (math.log(2) * n_bytes).

    nll_nats: summed NLL in nats of the tokens that encode the text, finite and >= 0 (a float, an
    int or a 0-d tensor); n_bytes: len(text.encode("utf-8")) of that same text, a whole number > 0
    (an int, a whole float such as 3.0, or a 0-d tensor). A tensor is read with .item(): a CUDA
    tensor synchronizes with the host, so in a training loop keep the sums on the device with
    lmloss.LossMeter and read them every N steps. Wrong types raise TypeError, wrong values ValueError.
    """
    nll, n = _as_nll(nll_nats), _as_count(n_bytes, "n_bytes")
    if n <= 0:
        raise ValueError(f"bits_per_byte needs n_bytes > 0, got {n}: the text scored is empty")
    return nll / (math.log(2) * n)


def perplexity(nll_nats, n_tokens) -> float:
    """Token perplexity: math.exp(nll_nats / n_tokens), nll_nats summed in nats over n_tokens targets.

    nll_nats: finite and >= 0 (a float, an int or a 0-d tensor); n_tokens: a whole number > 0 (an int,
    a whole float such as 3.0, or a 0-d tensor). A tensor is read with .item(): a CUDA tensor
    synchronizes with the host (lmloss.LossMeter keeps the sums on the device instead). Wrong types
    raise TypeError, wrong values ValueError; a mean NLL past ~709.78 nats gives inf.
    """
    nll, n = _as_nll(nll_nats), _as_count(n_tokens, "n_tokens")
    if n <= 0:
        raise ValueError(f"perplexity needs n_tokens > 0, got {n}: no token was scored")
    return _exp(nll / n)


@dataclass(frozen=True)
class LossTotals:
    """Sums behind every metric: summed NLL (nats, float64) and exact counts of what it was over.

    Mergeable with `+`; `all_reduce()` sums across a torch.distributed process group. Fields are
    checked and stored as Python numbers: nll_nats a finite float >= 0, counts whole numbers >= 0
    (a 0-d tensor is read with .item(), which synchronizes with the host for a CUDA tensor).
    """

    nll_nats: float = 0.0
    n_tokens: int = 0
    n_bytes: int = 0
    n_words: int = 0
    n_chars: int = 0

    def __post_init__(self):
        object.__setattr__(self, "nll_nats", _as_nll(self.nll_nats, "LossTotals.nll_nats"))
        for name in ("n_tokens", "n_bytes", "n_words", "n_chars"):
            n = _as_count(getattr(self, name), f"LossTotals.{name}")
            if n < 0:
                raise ValueError(f"LossTotals.{name} must be >= 0, got {n}: a count of what was scored")
            object.__setattr__(self, name, n)

    @classmethod
    def from_nll(cls, nll: torch.Tensor, *, mask: torch.Tensor | None = None, n_bytes: int = 0,
                 n_words: int = 0, n_chars: int = 0, where: str = "") -> "LossTotals":
        """Totals of per-token NLL (any shape, nats): nll[mask].double().clamp_min(0).sum() over mask.sum() tokens.

        `mask` (bool, same shape) selects the scored tokens; default all. A non-finite value raises
        ValueError naming `where` and the flat index of the first bad token.
        """
        if not isinstance(nll, torch.Tensor):
            raise TypeError(f"nll must be a tensor of per-token losses, got {type(nll).__name__}")
        if mask is not None:
            if mask.shape != nll.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != nll shape {tuple(nll.shape)}")
            nll = nll[mask.bool()]
        nll = nll.detach().reshape(-1)
        # The exact NLL is >= 0; a kernel's rounding can put a near-certain token a hair below
        # (-2e-6 nats): counted as 0, never a negative total. NaN stays NaN for the check below.
        total = nll.to(torch.float64).clamp_min(0.0).sum().item()
        if not math.isfinite(total):
            bad = (~torch.isfinite(nll)).nonzero()[0].item()
            src = f"{where}, " if where else ""
            raise ValueError(
                f"non-finite loss in {src}scored token {bad} (value {nll[bad].item()}): a NaN or inf "
                "logit reached the totals. Check the model's logits (dtype overflow, NaN weights)."
            )
        return cls(total, nll.numel(), n_bytes, n_words, n_chars)

    @classmethod
    def from_rows(cls, rows) -> "LossTotals":
        """The sum, in the given order, of per-document rows: dicts holding nll_nats, n_tokens,
        n_bytes, n_words and n_chars (as lmloss.evaluate and scripts/eval.py write them)."""
        return sum((cls(r["nll_nats"], r["n_tokens"], r["n_bytes"], r["n_words"], r["n_chars"]) for r in rows),
                   cls())

    def __add__(self, other: "LossTotals") -> "LossTotals":
        if not isinstance(other, LossTotals):
            return NotImplemented
        return LossTotals(self.nll_nats + other.nll_nats, self.n_tokens + other.n_tokens,
                          self.n_bytes + other.n_bytes, self.n_words + other.n_words,
                          self.n_chars + other.n_chars)

    def __radd__(self, other):  # sum([...]) starts from 0
        if other == 0:
            return self
        return NotImplemented

    def all_reduce(self, group=None) -> "LossTotals":
        """Sum these totals over a torch.distributed group: one collective of one float64 buffer (exact
        for counts up to 2**53), on the current CUDA device for nccl, else the CPU; reading the sum back
        synchronizes with the host. Every rank of the group must call it."""
        import torch.distributed as dist

        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        # float64 holds integers exactly up to 2**53, far beyond any token or byte count.
        buf = torch.tensor([self.nll_nats, self.n_tokens, self.n_bytes, self.n_words, self.n_chars],
                           dtype=torch.float64, device=device)
        dist.all_reduce(buf, group=group)
        nll, *counts = buf.tolist()
        return LossTotals(nll, *(int(c) for c in counts))

    def _ratio(self, denom_name: str) -> float:
        denom = getattr(self, denom_name)
        if denom <= 0:
            raise ValueError(f"cannot divide by {denom_name}=0: no {denom_name[2:]} were counted")
        return self.nll_nats / denom

    @property
    def nll_per_token(self) -> float:
        """Mean NLL in nats per scored token."""
        return self._ratio("n_tokens")

    @property
    def token_perplexity(self) -> float:
        return _exp(self._ratio("n_tokens"))

    @property
    def byte_perplexity(self) -> float:
        return _exp(self._ratio("n_bytes"))

    @property
    def word_perplexity(self) -> float:
        return _exp(self._ratio("n_words"))

    @property
    def bits_per_byte(self) -> float:
        return self._ratio("n_bytes") / math.log(2)

    @property
    def bits_per_char(self) -> float:
        """nll_nats / (ln 2 * n_chars), characters being Unicode code points (str length)."""
        return self._ratio("n_chars") / math.log(2)

    def to_dict(self) -> dict:
        """The sums, as a JSON-ready dict."""
        return asdict(self)

    def metrics(self) -> dict:
        """Every metric these sums support; one whose denominator is 0 is left out."""
        out = {}
        for name in ("token_perplexity", "byte_perplexity", "word_perplexity", "bits_per_byte",
                     "bits_per_char"):
            try:
                out[name] = getattr(self, name)
            except ValueError:
                pass
        return out
