"""Tokenizers (stub: tokenizer helper owns it)."""


class Tokenizer:
    pass


def load_tokenizer(spec):
    raise NotImplementedError


def token_byte_lengths(tokenizer):
    raise NotImplementedError
