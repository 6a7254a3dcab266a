"""Vocabulary-parallel NLL (stub)."""


def vocab_parallel_token_nll(local_logits, targets, *, vocab_start, group=None, ignore_index=-100):
    raise NotImplementedError
