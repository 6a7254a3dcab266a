"""Loss sums for a training loop, kept on the device: no host sync until they are read.

    meter = lmloss.LossMeter(lmloss.token_byte_lengths(tok))   # (V,) bytes of each token id
    meter.update(nll, targets)        # each step: three sums on the device, no .item()
    meter.all_reduce().totals()       # every N steps: one collective, one host sync -> LossTotals
    meter.reset()

The sums are what lmloss.metrics.LossTotals holds (nats in float64, token and byte counts in int64),
so bits per byte is their ratio over all the steps since reset(), never a mean of per-step ratios.
"""

from __future__ import annotations

import numbers

import torch

from lmloss.metrics import LossTotals

__all__ = ["LossMeter"]


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


class LossMeter:
    """Running sums of per-token NLL, on the device of the tensors passed to update():

        nll_nats += nll.double().clamp_min(0)[targets != ignore_index].sum()
        n_tokens += (targets != ignore_index).sum()
        n_bytes  += token_bytes[targets[targets != ignore_index]].sum()   # when token_bytes is given

    token_bytes: the (V,) integer tensor of lmloss.token_byte_lengths(tok), moved to the device once,
    or None to count no bytes. update() only checks shapes, dtypes and devices: it never reads a
    tensor's values on the host, so it never waits for the device. Target ids are not range-checked
    (that would read them); one outside [0, V) fails in the indexing of token_bytes (on CUDA, as a
    device-side assert). A NaN or inf loss is carried in the sum and raised by totals().
    """

    def __init__(self, token_bytes: torch.Tensor | None = None, *, ignore_index: int = -100):
        if token_bytes is not None:
            if not (isinstance(token_bytes, torch.Tensor) and token_bytes.dim() == 1
                    and _is_integer(token_bytes.dtype)):
                got = (f"a {token_bytes.dtype} tensor of shape {tuple(token_bytes.shape)}"
                       if isinstance(token_bytes, torch.Tensor) else type(token_bytes).__name__)
                raise TypeError(f"token_bytes must be a (V,) integer tensor of each token id's UTF-8 bytes, got "
                                f"{got}; pass lmloss.token_byte_lengths(tokenizer), or None to count no bytes")
            token_bytes = token_bytes.detach().to(torch.int64)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int (the padding target id, e.g. -100), "
                            f"got {type(ignore_index).__name__} {ignore_index!r}")
        self.token_bytes = token_bytes
        self.ignore_index = int(ignore_index)
        self._nll_nats: torch.Tensor | None = None  # () float64, on the device of the first update
        self._counts: torch.Tensor | None = None  # (2,) int64: n_tokens, n_bytes

    def update(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: nll (...) per-token NLL in nats, any float dtype (e.g. lmloss.token_nll's
        output or F.cross_entropy(..., reduction="none")); targets (...) integer ids, same shape.
        Detached: the meter never holds the autograd graph."""
        self._check(nll, targets)
        keep = targets != self.ignore_index
        nll_nats = torch.where(keep, nll.detach().to(torch.float64).clamp_min(0.0), 0.0).sum()  # ()
        n_tokens = keep.sum()
        if self.token_bytes is None:
            n_bytes = torch.zeros_like(n_tokens)
        else:
            if self.token_bytes.device != targets.device:
                self.token_bytes = self.token_bytes.to(targets.device)  # once: the state stays there
            ids = torch.where(keep, targets, 0).long()  # ignored targets index id 0, then count 0
            n_bytes = torch.where(keep, self.token_bytes[ids], 0).sum()
        nll_nats_acc, counts = self._state(nll.device)
        nll_nats_acc.add_(nll_nats)
        counts.add_(torch.stack([n_tokens, n_bytes]))

    def all_reduce(self, group=None) -> "LossMeter":
        """Sum the meter over the ranks of a torch.distributed group, in place, in one collective of
        one float64 buffer (as LossTotals.all_reduce; float64 holds counts exactly up to 2**53).
        No host sync. Without an initialized process group (and group=None) it is a no-op: one
        process is the whole world. Returns the meter, for meter.all_reduce().totals()."""
        import torch.distributed as dist

        if group is None and not (dist.is_available() and dist.is_initialized()):
            return self
        if self._nll_nats is None:  # this rank saw no batch: it still joins the collective
            cuda = dist.get_backend(group) == "nccl"
            self._state(torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
        buf = torch.cat([self._nll_nats.view(1), self._counts.to(torch.float64)])  # (3,)
        dist.all_reduce(buf, group=group)
        self._nll_nats.copy_(buf[0])
        self._counts.copy_(buf[1:].to(torch.int64))
        return self

    def totals(self) -> LossTotals:
        """The sums as a LossTotals (n_words and n_chars 0): one host sync. ValueError if a NaN or inf
        loss was added since reset()."""
        if self._nll_nats is None:
            return LossTotals()
        nll_nats, n_tokens, n_bytes = torch.cat([self._nll_nats.view(1), self._counts.to(torch.float64)]).tolist()
        return LossTotals(nll_nats, int(n_tokens), int(n_bytes))

    def bits_per_byte(self) -> float:
        """nll_nats / (ln 2 * n_bytes) of the totals (a host sync)."""
        if self.token_bytes is None:
            raise ValueError("this LossMeter counts no bytes: make it with "
                             "LossMeter(lmloss.token_byte_lengths(tokenizer)) to get bits per byte")
        return self.totals().bits_per_byte

    def perplexity(self) -> float:
        """exp(nll_nats / n_tokens) of the totals (a host sync)."""
        return self.totals().token_perplexity

    def reset(self) -> None:
        """Zero the sums, in place on their device."""
        if self._nll_nats is not None:
            self._nll_nats.zero_()
            self._counts.zero_()

    def _state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._nll_nats is None:
            self._nll_nats = torch.zeros((), dtype=torch.float64, device=device)
            self._counts = torch.zeros(2, dtype=torch.int64, device=device)
        return self._nll_nats, self._counts

    def _check(self, nll, targets) -> None:
        """Types, dtypes, shapes and devices only: nothing that reads a value."""
        if not isinstance(nll, torch.Tensor) or not nll.dtype.is_floating_point:
            got = nll.dtype if isinstance(nll, torch.Tensor) else type(nll).__name__
            raise TypeError(f"nll must be a floating-point tensor of per-token losses in nats, got {got}; pass "
                            "lmloss.token_nll(logits, targets) or F.cross_entropy(..., reduction='none')")
        if not isinstance(targets, torch.Tensor) or not _is_integer(targets.dtype):
            got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise TypeError(f"targets must be an integer tensor of token ids, got {got}; use targets.long()")
        if nll.shape != targets.shape:
            raise ValueError(f"nll shape {tuple(nll.shape)} != targets shape {tuple(targets.shape)}: pass one "
                             "loss per target (reduction='none'), e.g. F.cross_entropy(logits.flatten(0, -2), "
                             "targets.flatten(), reduction='none').view(targets.shape)")
        if nll.device != targets.device:
            raise ValueError(f"nll is on {nll.device} but targets on {targets.device}; move them to one device")
        if self._nll_nats is not None and self._nll_nats.device != nll.device:
            raise ValueError(f"this LossMeter sums on {self._nll_nats.device}, got a batch on {nll.device}; "
                             "pass every batch from one device, or make one meter per device")

    def __repr__(self) -> str:
        where = "empty" if self._nll_nats is None else f"on {self._nll_nats.device}"
        counts_bytes = "yes" if self.token_bytes is not None else "no"
        return f"LossMeter({where}, counts bytes: {counts_bytes}, ignore_index={self.ignore_index})"
