"""Fused linear cross-entropy (stub: linear helper owns it)."""


def linear_token_nll(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None, chunk_size=None, impl="auto"):
    raise NotImplementedError


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None, reduction="mean", chunk_size=None, impl="auto"):
    raise NotImplementedError
