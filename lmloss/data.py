"""Corpora as documents of text, by name or by path. No tokenizing, no batching.

    docs = load_corpus("wikitext")                  # 62 article pages, as lm-evaluation-harness scores
    docs = load_corpus("wikitext", form="stream")   # one document: "\\n\\n".join(rows), the HF guide's text
    docs = load_corpus("wikitext", form="rows")     # the 4,358 rows of datasets' wikitext-2-raw-v1 test
    docs = load_corpus("lambada")                   # 5,153 LAMBADA (OpenAI) test passages
    docs = load_corpus("notes.txt")                 # any .txt, .jsonl or .parquet file (or a folder of .txt)

Names load from a local mirror first when `data_dir` or $LMLOSS_DATA_DIR is set (laid out like
wikitext-2-raw-v1/wiki.test.raw or .../test.jsonl, lambada/lambada_test.jsonl), else through
`datasets` from the hub. Counts follow lm-evaluation-harness: bytes = UTF-8 bytes, words =
len(re.split(r"\\s+", text)), chars = len(text), always on the original text (before detokenizing).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "load_corpus", "wikitext_detokenize", "wikitext_rows", "wikitext_pages",
           "CORPORA", "FORMS"]

FORMS = ("rows", "stream", "pages")
_WHITESPACE_RUN = re.compile(r"\s+")


@dataclass(frozen=True)
class Document:
    """One scored text. `text` is what the model sees; `original` (default: text) is what bytes,
    words and characters are counted on, as lm-evaluation-harness counts WikiText on the page
    before detokenizing it; `name` is a label such as the page title."""

    text: str
    original: str | None = None
    name: str = ""

    @property
    def counted_text(self) -> str:
        return self.text if self.original is None else self.original

    @property
    def n_bytes(self) -> int:
        return len(self.counted_text.encode("utf-8"))

    @property
    def n_words(self) -> int:
        """lm-evaluation-harness's rule: len(re.split(r"\\s+", text)); "" counts 1, " a " counts 3.
        Counted as 1 + the number of whitespace runs, which is the same number without building the
        list of words (a 50 MB document would need ~500 MB for it)."""
        return 1 + sum(1 for _ in _WHITESPACE_RUN.finditer(self.counted_text))

    @property
    def n_chars(self) -> int:
        return len(self.counted_text)


@dataclass(frozen=True)
class _Corpus:
    hub: tuple[str, str | None, str, str]  # (path, config, split, text field) for datasets.load_dataset
    local: tuple[str, ...]                 # files under the data folder, first found wins
    forms: tuple[str, ...]
    default_form: str


CORPORA = {
    "wikitext": _Corpus(hub=("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
                        local=("wikitext-2-raw-v1/test.jsonl", "wikitext-2-raw-v1/wiki.test.raw",
                               "test.jsonl", "wiki.test.raw"),
                        forms=("pages", "rows", "stream"), default_form="pages"),
    "lambada": _Corpus(hub=("EleutherAI/lambada_openai", "default", "test", "text"),
                       local=("lambada/lambada_test.jsonl", "lambada_test.jsonl"),
                       forms=("rows", "stream"), default_form="rows"),
}
_ALIASES = {"wikitext-2": "wikitext", "wikitext2": "wikitext", "wikitext-2-raw-v1": "wikitext",
            "lambada_openai": "lambada"}


# -- WikiText ---------------------------------------------------------------------------------------

def wikitext_rows(raw: str) -> list[str]:
    """The rows `datasets` builds from wiki.test.raw: every line of the file with its "\\n", and ""
    for a line that is only whitespace (the file is read in text mode, so \\r\\n and \\r end lines too)."""
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    lines = raw.split("\n")
    rows = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        rows.append(lines[-1])
    return [row if row.strip() else "" for row in rows]


def _is_title(line: str) -> bool:
    """A level-1 heading ' = Title = ' (not ' = = Section = = ')."""
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") and len(s) > 3


def wikitext_pages(rows: list[str]) -> list[Document]:
    """The article pages of EleutherAI/wikitext_document_level from the rows of `datasets`.

    The page builder reads the file's lines and starts a page at each level-1 heading; a page is its
    lines joined by "\\n". Rows drop the "\\n" and turn whitespace-only lines into "": WikiText's
    blank lines are a single space, so each "" is restored as " " (the tests check the 62 pages of
    the test split against the published file, byte for byte).
    """
    lines = [row[:-1] if row.endswith("\n") else (row or " ") for row in rows]
    lines.append("")  # the file ends with "\n": the last page ends with an empty line
    pages, current = [], []
    for line in lines:
        if _is_title(line):
            if "".join(current).strip():
                pages.append(current)
            current = []
        current.append(line)
    if "".join(current).strip():
        pages.append(current)
    return [Document("\n".join(p), name=p[0].strip().strip("=").strip()) for p in pages]


# lm-evaluation-harness's WikiText detokenizer (lm_eval/tasks/wikitext/preprocess_wikitext.py), as
# ordered rewrite steps: ("str", old, new) is str.replace, ("re", pattern, repl) is re.sub.
_DETOKENIZE_STEPS = (
    ("str", "s '", "s'"),
    # Upstream pattern is written with literal slashes, so it only rewrites text such as "/' 1/";
    # kept as is: scores must match lm-eval's, not what the pattern was meant to do.
    ("re", r"/' [0-9]/", r"/'[0-9]/"),
    ("str", " @-@ ", "-"), ("str", " @,@ ", ","), ("str", " @.@ ", "."),
    ("str", " : ", ": "), ("str", " ; ", "; "), ("str", " . ", ". "),
    ("str", " ! ", "! "), ("str", " ? ", "? "), ("str", " , ", ", "),
    # brackets and quotes: drop the spaces just inside each (non-nested) pair
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"), ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"), ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="), ("str", "= = =", "==="), ("str", "= =", "=="),
    ("str", " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    ("str", " \n", "\n"), ("str", "\n ", "\n"),
    ("str", " N ", " 1 "), ("str", " 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
    """lm-evaluation-harness's WikiText detokenizer: undo the tokenized spacing (" @-@ " -> "-",
    " , " -> ", ", "( a )" -> "(a)", ...). Quote pairing spans the whole text, so detokenizing a page
    and detokenizing the joined stream differ."""
    for kind, old, new in _DETOKENIZE_STEPS:
        text = text.replace(old, new) if kind == "str" else re.sub(old, new, text)
    return text


# -- files ------------------------------------------------------------------------------------------

def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8: byte offset {e.start} (0x{data[e.start]:02x}): {e.reason}. "
            f"Re-encode it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}") from None


_FIELD_HINT = "pass --text-field NAME (field= in load_corpus)"


def _pick_field(keys, field: str | None, where: str) -> str:
    """The text field of a record: `field` if given, else "text", else "page"."""
    if field is not None:
        if field not in keys:
            raise ValueError(f"{where} has no field {field!r} (fields: {sorted(keys)}); {_FIELD_HINT}")
        return field
    for name in ("text", "page"):
        if name in keys:
            return name
    raise ValueError(f"{where} has no 'text' or 'page' field (fields: {sorted(keys)}); {_FIELD_HINT}")


def _text(value, key: str, where: str) -> str:
    """The value of a record's text field, which must be a string (never str(None) or str(3))."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text field {key!r} holds {type(value).__name__}, not a string; fix or "
                         f"drop that record, or if the text is in another field, {_FIELD_HINT}")
    return value


def _read_jsonl(path: Path, field: str | None) -> list[str]:
    texts = []
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not JSON ({e.msg}); expected one object per line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {i} is a {type(record).__name__}, expected a JSON object")
        key = _pick_field(record.keys(), field, f"{path} line {i}")
        texts.append(_text(record[key], key, f"{path} line {i}"))
    return texts


def _read_parquet(path: Path, field: str | None) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow ({e})") from None
    table = pq.read_table(path)
    key = _pick_field(table.column_names, field, str(path))
    return [_text(v, key, f"{path} row {i}") for i, v in enumerate(table.column(key).to_pylist(), 1)]


def _read_file(path: Path, field: str | None) -> list[Document]:
    """Documents of a local file: .txt one document, .jsonl/.parquet one per record, .raw WikiText rows."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [Document(t) for t in _read_jsonl(path, field)]
    if suffix == ".parquet":
        return [Document(t) for t in _read_parquet(path, field)]
    if suffix == ".raw":
        return [Document(t) for t in wikitext_rows(_read_utf8(path))]
    if suffix == ".txt":
        return [Document(_read_utf8(path), name=path.stem)]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .txt, .jsonl, .parquet or .raw")


def _read_path(path: Path, field: str | None) -> list[Document]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"folder {path} holds no .txt files; pass a file or a folder of .txt documents")
        return [d for f in files for d in _read_file(f, field)]
    return _read_file(path, field)


# -- names ------------------------------------------------------------------------------------------

def _load_named_rows(name: str, corpus: _Corpus, data_dir: str | None) -> list[str]:
    """Rows of a named corpus: the local mirror first (when a folder is given), then the hub."""
    tried = []
    folder = data_dir or os.environ.get("LMLOSS_DATA_DIR")
    if folder:
        for rel in corpus.local:
            path = Path(folder).expanduser() / rel
            if path.is_file():
                return [d.text for d in _read_file(path, None)]
        tried.append(f"local files {', '.join(corpus.local)} under {folder} (none exists)")
    else:
        tried.append("no local folder (data_dir / $LMLOSS_DATA_DIR unset)")
    hub_path, config, split, field = corpus.hub
    try:
        import datasets

        return list(datasets.load_dataset(hub_path, config, split=split)[field])
    except Exception as e:  # offline, missing package, hub error: all end in the same advice
        first = str(e).splitlines()[0] if str(e) else ""
        tried.append(f"datasets.load_dataset({hub_path!r}, {config!r}, split={split!r}): "
                     f"{type(e).__name__}: {first}")
    raise ValueError(
        f"could not load corpus {name!r}. Tried: " + "; ".join(tried) + ". Offline, point lmloss at a "
        f"local copy: set LMLOSS_DATA_DIR (or pass data_dir / --data-dir) to a folder holding "
        f"{' or '.join(corpus.local[:2])}, or pass the path of a .txt, .jsonl or .parquet file.")


def _shape(rows: list[str], form: str, name: str) -> list[Document]:
    if form == "rows":
        return [Document(r) for r in rows]
    if form == "stream":
        return [Document("\n\n".join(rows), name=name)]
    return wikitext_pages(rows)


def load_corpus(name_or_path: str, *, form: str | None = None, data_dir: str | None = None,
                detokenize: bool = False, limit: int | None = None,
                field: str | None = None) -> list[Document]:
    """Documents of a named corpus ("wikitext", "lambada") or of a local file or folder.

    form: "pages" | "rows" | "stream" for names (default: wikitext "pages", lambada "rows"); for
    files "rows" (as read, the default) or "stream" (joined by "\\n\\n"). detokenize: apply
    lm-evaluation-harness's WikiText detokenizer to each document's text and keep the text as read
    in `original`, on which bytes/words/chars are counted. limit: keep the first `limit` documents.
    field: the text field of a .jsonl/.parquet file (default "text", else "page"); every record's
    value there must be a string (rows are numbered from 1 in errors).
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not str(name_or_path).strip():  # Path("") would be the current folder
        raise ValueError(f"the corpus name is empty ({name_or_path!r}); pass a known name "
                         f"({', '.join(CORPORA)}) or the path of a .txt, .jsonl or .parquet file or a folder "
                         "of .txt files")
    key = _ALIASES.get(str(name_or_path), str(name_or_path))
    if key in CORPORA:
        corpus = CORPORA[key]
        form = form or corpus.default_form
        if form not in corpus.forms:
            raise ValueError(f"corpus {key!r} has forms {corpus.forms}, got form={form!r}")
        docs = _shape(_load_named_rows(key, corpus, data_dir), form, key)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise ValueError(f"unknown corpus {name_or_path!r}: not a known name ({', '.join(CORPORA)}) "
                             f"and no such file or folder. Pass a name or a .txt, .jsonl or .parquet path")
        form = form or "rows"
        if form not in ("rows", "stream"):
            raise ValueError(f"a file corpus has forms ('rows', 'stream'), got form={form!r}")
        docs = _read_path(path, field)
        if form == "stream":
            docs = [Document("\n\n".join(d.text for d in docs), name=path.name)]
    if limit is not None:
        docs = docs[:limit]
    if not any(d.text for d in docs):
        raise ValueError(f"corpus {name_or_path!r} (form={form!r}, limit={limit}) has no text: "
                         f"{len(docs)} documents, all empty")
    if detokenize:
        docs = [Document(wikitext_detokenize(d.text), original=d.text, name=d.name) for d in docs]
    return docs
