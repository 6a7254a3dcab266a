"""Corpora (stub: data helper owns it)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    text: str


def load_corpus(name_or_path, **kwargs):
    raise NotImplementedError
