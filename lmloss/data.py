"""Corpora as documents of text: by name, by path, or any Hugging Face dataset. No tokenizing, no batching.

    docs = load_corpus("wikitext")                  # 62 article pages, as lm-evaluation-harness scores
    docs = load_corpus("wikitext", form="stream")   # one document: "\\n\\n".join(rows), the HF guide's text
    docs = load_corpus("wikitext", form="rows")     # the 4,358 rows of datasets' wikitext-2-raw-v1 test
    docs = load_corpus("lambada")                   # 5,153 LAMBADA (OpenAI) test passages
    docs = load_corpus("ptb")                       # Mikolov's PTB test; words count one <eos> a line
    docs = load_corpus("pile", subset="ArXiv")      # every name of lmloss.corpora.CORPORA
    docs = load_corpus("notes.txt")                 # a .txt, .jsonl(.gz/.zst) or .parquet file, a folder of .txt
    docs = load_corpus("hf:allenai/c4:en:validation:text", max_bytes=10**7)  # any HF dataset, streamed
    for doc in iter_corpus("huge.jsonl"): ...       # one document at a time, bounded memory

Names load from a local mirror first when `data_dir` or $LMLOSS_DATA_DIR is set, else from the hub;
lmloss/corpora.py is the table of names, sources, local file names and conventions. Counts are on
the original text (before detokenizing): bytes = UTF-8 bytes, chars = len(text), words by the
Document's word rule: lm-evaluation-harness's len(re.split(r"\\s+", text)) unless the corpus says
otherwise (PTB: whitespace words + one <eos> per line).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["Document", "iter_corpus", "load_corpus", "parse_hf_spec", "takes_field", "takes_subset", "check_corpus_options",
           "FORMS",
           "WORD_RULES", "HF_GRAMMAR"]

FORMS = ("rows", "stream", "pages", "raw")
_WORD_BLOCK = 1 << 20  # characters per str.split call: the list of one block's words, not the whole text's


def _split_counts(text: str) -> tuple[int, int]:
    """(words, whitespace runs) of text: what len(re.findall(r"\\S+", text)) and len(re.findall(r"\\s+", text))
    count, with str.split block by block (3-4x faster than the regex; the same whitespace: re's \\s on str and
    str.split both take str.isspace), fixing up a word or a run cut in two by a block's end."""
    words = runs = 0
    prev_trail = None  # whether the previous block ended in whitespace
    for start in range(0, len(text), _WORD_BLOCK):
        block = text[start:start + _WORD_BLOCK]
        w = len(block.split())
        lead, trail = block[0].isspace(), block[-1].isspace()
        r = w - 1 + lead + trail if w else 1  # runs between, before and after the block's words
        if prev_trail is not None:
            r -= prev_trail and lead  # one run across the cut
            w -= not prev_trail and not lead  # one word across the cut
        words, runs, prev_trail = words + w, runs + r, trail
    return words, runs


def _lm_eval_words(text: str) -> int:
    """len(re.split(r"\\s+", text)), counted as 1 + the number of whitespace runs: the same number
    without building the list (a 50 MB document would need ~500 MB for it). "" counts 1, " a " 3."""
    return 1 + _split_counts(text)[1]


def _ptb_words(text: str) -> int:
    """sum(len(line.split()) + 1 for line in lines): the words of each line plus its <eos>, as
    word-level PTB readers count (PyTorch word_language_model: line.split() + ['<eos>']). A line ends
    at "\\n"; a last line without one counts too; "" has no lines, so 0 words."""
    n_lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return _split_counts(text)[0] + n_lines


_WORD_COUNTS = {"lm-eval": _lm_eval_words, "ptb": _ptb_words}
WORD_RULES = tuple(_WORD_COUNTS)


@dataclass(frozen=True)
class Document:
    """One scored text. `text` is what the model sees; `original` (default: text) is what bytes,
    words and characters are counted on, as lm-evaluation-harness counts WikiText on the page
    before detokenizing it; `name` is a label such as the page title; `words` names the word rule
    of n_words ("lm-eval" unless the corpus's convention says otherwise, e.g. "ptb")."""

    text: str
    original: str | None = None
    name: str = ""
    words: str = "lm-eval"

    def __post_init__(self):
        if self.words not in _WORD_COUNTS:
            raise ValueError(f"Document words={self.words!r} is not a word rule; expected one of {WORD_RULES}")

    @property
    def counted_text(self) -> str:
        return self.text if self.original is None else self.original

    @property
    def n_bytes(self) -> int:
        return len(self.counted_text.encode("utf-8"))

    @property
    def n_words(self) -> int:
        """By the word rule `words`: "lm-eval" len(re.split(r"\\s+", text)); "ptb" the whitespace
        words plus one <eos> per line."""
        return _WORD_COUNTS[self.words](self.counted_text)

    @property
    def n_chars(self) -> int:
        return len(self.counted_text)


# -- files: read lazily, one line / one parquet row group at a time ------------------------------------

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".parquet")  # files of records with fields
_FIELD_HINT = "pass --text-field NAME (field= in load_corpus)"


def _not_utf8(path: Path, offset: int, byte: int, reason: str) -> ValueError:
    return ValueError(f"{path} is not UTF-8: byte offset {offset} (0x{byte:02x}): {reason}. "
                      f"Re-encode it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}")


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e.start, data[e.start], e.reason) from None


def _open_binary(path: Path):
    """path opened for reading bytes, decompressing .gz and .zst on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise ValueError(f"reading {path} needs zstandard: pip install zstandard ({e}); or decompress it "
                             f"first: zstd -d {path.name}") from None
        # the decompressing reader has no readline: a buffer over it gives lines
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


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


def _text(value, key: str, where: str, hint: str = _FIELD_HINT) -> str:
    """The value of a record's text field, which must be a string (never str(None) or str(3))."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text field {key!r} holds {type(value).__name__}, not a string; fix or "
                         f"drop that record, or if the text is in another field, {hint}")
    return value


def read_jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a JSON-lines file (.jsonl, or .gz/.zst of one),
    one line in memory at a time; `where` is "PATH line N" for errors. Lines end at b"\\n" only."""
    with _open_binary(path) as f:
        offset = 0
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset + e.start, raw[e.start], e.reason) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i} is not JSON ({e.msg}); expected one object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {i} is a {type(record).__name__}, expected a JSON object")
            yield f"{path} line {i}", record


def record_texts(records: Iterable[tuple[str, dict]], field: str | None) -> Iterator[str]:
    """The text field of each (where, record): `field`, else "text", else "page"; always a string."""
    for where, record in records:
        key = _pick_field(record.keys(), field, where)
        yield _text(record[key], key, where)


def read_parquet_texts(path: Path, field: str | None) -> Iterator[str]:
    """The text column of a parquet file, one row group in memory at a time (rows numbered from 1)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow ({e})") from None
    parquet = pq.ParquetFile(path)
    key = _pick_field(parquet.schema_arrow.names, field, str(path))
    row = 0
    for group in range(parquet.num_row_groups):
        for value in parquet.read_row_group(group, columns=[key]).column(0).to_pylist():
            row += 1
            yield _text(value, key, f"{path} row {row}")


def _whole_file(path: Path) -> Iterator[Document]:
    yield Document(read_utf8(path), name=path.stem)


def read_file(path: Path, field: str | None) -> Iterator[Document]:
    """Documents of a local file, lazily: .txt one document, .jsonl(.gz/.zst)/.parquet one per record,
    .raw WikiText rows."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return (Document(t) for t in read_parquet_texts(path, field))
    if name.endswith(RECORD_SUFFIXES):
        return (Document(t) for t in record_texts(read_jsonl_records(path), field))
    if name.endswith(".raw"):
        from lmloss.corpora import wikitext_rows

        return (Document(t) for t in wikitext_rows(read_utf8(path)))
    if name.endswith(".txt"):
        return _whole_file(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .txt, .jsonl (or .jsonl.gz, "
                     ".json.gz, .jsonl.zst), .parquet or .raw")


def _read_path(path: Path, field: str | None) -> Iterator[Document]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"folder {path} holds no .txt files; pass a file or a folder of .txt documents")
        return (d for f in files for d in read_file(f, field))
    return read_file(path, field)


# -- hf:PATH[:CONFIG[:SPLIT[:FIELD]]] -----------------------------------------------------------------

HF_GRAMMAR = "hf:PATH[:CONFIG[:SPLIT[:FIELD]]]"
_HF_EXAMPLES = ("e.g. hf:allenai/c4:en:validation:text, hf:allenai/paloma:c4_100_domains:val or "
                "hf:/data/my_dataset::test:content")
_DEFAULT_SPLITS = ("test", "validation", "valid", "val")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None, str | None]:
    """'hf:allenai/c4:en:validation:text' -> ('allenai/c4', 'en', 'validation', 'text'); a part left
    empty (or out) is None; PATH may not be empty. A PATH holding ':' cannot be written this way."""
    parts = [p.strip() for p in spec[len("hf:"):].split(":")] if spec.startswith("hf:") else []
    if not parts or len(parts) > 4 or not parts[0]:
        why = ("it does not start with 'hf:'" if not parts else f"it has {len(parts)} parts" if len(parts) > 4
               else "PATH is empty")
        raise ValueError(f"malformed dataset spec {spec!r} ({why}); expected {HF_GRAMMAR} where CONFIG, SPLIT and "
                         f"FIELD may be empty, {_HF_EXAMPLES}")
    parts += [""] * (4 - len(parts))
    return parts[0], parts[1] or None, parts[2] or None, parts[3] or None


def open_hf(path: str, config: str | None, split: str | None, *, what: str):
    """(streamed rows, split name) of a Hugging Face dataset: a hub name, or a local folder of
    parquet/jsonl/csv/arrow files, both read with datasets.load_dataset(..., streaming=True), so
    nothing is held in memory or copied to the datasets cache. split None: "test", else "validation"
    (or "valid", "val"), else an error listing the splits."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{what} needs the datasets package: pip install datasets ({e})") from None
    local = Path(path).expanduser()
    if path.startswith(("/", ".", "~")) and not local.is_dir():
        raise ValueError(f"{what}: no folder {local}; pass a folder of parquet, jsonl, csv or arrow files, or a "
                         "hub name such as allenai/c4")
    is_local = local.is_dir()
    source = str(local) if is_local else path
    if not is_local:
        from lmloss.hub import hub_reachable, unreachable_note

        if not hub_reachable():  # streamed rows come from the hub; datasets would retry for ~20 s first
            raise ValueError(f"datasets.load_dataset({source!r}, {config!r}, streaming=True) not tried: its rows "
                             f"stream from the hub, and {unreachable_note()}")
    try:
        splits = datasets.load_dataset(source, config, streaming=True)
    except Exception as e:  # offline, unknown name, bad config, no data files: all end in one message
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"datasets.load_dataset({source!r}, {config!r}, streaming=True) failed: "
                         f"{type(e).__name__}: {first}") from None
    names = list(splits)
    if split is None:
        split = next((s for s in _DEFAULT_SPLITS if s in names), None)
        if split is None:
            raise ValueError(f"{what} has no test or validation split (splits: {names}); name one: "
                             f"hf:{path}:{config or ''}:{names[0] if names else 'SPLIT'}")
    elif split not in names:
        raise ValueError(f"{what} has no split {split!r} (splits: {names}); pass one of them as SPLIT in {HF_GRAMMAR}")
    return splits[split], split


def _hf_string_columns(features, first: dict | None) -> list[str]:
    if features:
        return [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    return [c for c, v in (first or {}).items() if isinstance(v, str)]


def hf_field(rows, field: str | None, *, what: str) -> tuple[str, Iterator[dict]]:
    """(text field, rows) of streamed rows: `field` if given, else "text", else the only string
    column; several string columns and no "text" is ambiguous, an error listing them."""
    features = rows.features
    first, it = None, iter(rows)
    if not features:  # json streams may not know their columns before the first row
        first = next(it, None)
        it = chain([first], it) if first is not None else iter(())
    columns = list(features) if features else list(first or {})
    hint = f"name the field as FIELD in {HF_GRAMMAR} (field= in load_corpus, --text-field)"
    if field is not None:
        if field not in columns:
            raise ValueError(f"{what} has no column {field!r} (columns: {columns}); {hint}")
        return field, it
    if "text" in columns:
        return "text", it
    strings = _hf_string_columns(features, first)
    if len(strings) == 1:
        return strings[0], it
    if not strings:
        raise ValueError(f"{what} has no 'text' column and no string column (columns: {columns}); {hint}")
    raise ValueError(f"{what} has no 'text' column and several string columns {strings}, so the text field is "
                     f"ambiguous (columns: {columns}); {hint}")


def _iter_hf(spec: str, field: str | None) -> Iterator[Document]:
    path, config, split, spec_field = parse_hf_spec(spec)
    if field is not None and spec_field is not None and field != spec_field:
        raise ValueError(f"{spec!r} names the field {spec_field!r} but field={field!r} was passed; pass one of them")
    rows, split = open_hf(path, config, split, what=spec)
    key, it = hf_field(rows, field or spec_field, what=f"{spec} (split {split!r})")
    hint = f"name the text field as FIELD in {HF_GRAMMAR}"
    return (Document(_text(row[key], key, f"{spec} (split {split!r}) row {i}", hint)) for i, row in enumerate(it, 1))


# -- corpora ----------------------------------------------------------------------------------------

def _one_document(docs: Iterator[Document], name: str, join: str = "\n\n") -> Iterator[Document]:
    yield Document(join.join(d.text for d in docs), name=name)


def iter_corpus(name_or_path: str, *, form: str | None = None, data_dir: str | None = None,
                detokenize: bool = False, field: str | None = None, subset: str | None = None) -> Iterator[Document]:
    """The documents of a corpus, one at a time: a name of lmloss.corpora.CORPORA (local mirror under
    `data_dir` or $LMLOSS_DATA_DIR first, then the hub), an `hf:PATH[:CONFIG[:SPLIT[:FIELD]]]` spec, or
    a local .txt / .jsonl(.gz/.zst) / .parquet / .raw file or folder of .txt files.

    Memory: form "rows" (files, hf: specs and most names) holds one document at a time, plus one
    line, one parquet row group or one streamed batch; forms "pages" and "stream" build the whole
    corpus first. The spec, name, form, subset and hf split/field are checked when this is called;
    an error in the data itself (a bad line, a non-string value) comes when it is reached.
    form: see load_corpus. subset: a part of a named corpus (pile: a meta.pile_set_name; paloma: a
    source). field: the text field of .jsonl/.parquet records or of an hf: dataset.
    """
    from lmloss import corpora  # names and WikiText's conventions; built on this module's readers

    spec = str(name_or_path)
    if not spec.strip():  # Path("") would be the current folder
        raise ValueError(f"the corpus name is empty ({name_or_path!r}); pass a known name "
                         f"({', '.join(corpora.CORPORA)}), an {HF_GRAMMAR} spec, or the path of a .txt, .jsonl or "
                         ".parquet file or a folder of .txt files")
    key = corpora.ALIASES.get(spec, spec)
    if key in corpora.CORPORA:
        if field is not None:
            raise ValueError(f"corpus {key!r} has its own text field (lmloss.corpora.CORPORA[{key!r}]); field= (or "
                             "--text-field) is for .jsonl/.parquet files and hf: specs: drop it")
        docs = corpora.iter_named(key, form=form, data_dir=data_dir, subset=subset)
    else:
        if subset is not None:
            raise ValueError(f"subset={subset!r} picks a part of a named corpus ({corpora.with_subsets()}); "
                             f"{spec!r} is not one: drop subset")
        form = form or "rows"
        if form not in ("rows", "stream", "raw"):
            raise ValueError(f"a file or hf: corpus has forms ('rows', 'stream', 'raw'), got form={form!r}")
        label = spec
        if spec.startswith("hf:"):
            docs = _iter_hf(spec, field)
        else:
            path = Path(spec).expanduser()
            if not path.exists():
                raise ValueError(f"unknown corpus {spec!r}: not a known name ({', '.join(corpora.CORPORA)}), not "
                                 f"an {HF_GRAMMAR} spec, and no such file or folder. Pass a name, an hf: spec or a "
                                 ".txt, .jsonl or .parquet path")
            docs, label = _read_path(path, field), path.name
        if form in ("stream", "raw"):  # raw: the rows as read, back to back (a .txt file: the file)
            docs = _one_document(docs, label, "\n\n" if form == "stream" else "")
    if detokenize:
        docs = (Document(corpora.wikitext_detokenize(d.text), original=d.text, name=d.name, words=d.words)
                for d in docs)
    return docs


def _positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def load_corpus(name_or_path: str, *, form: str | None = None, data_dir: str | None = None,
                detokenize: bool = False, limit: int | None = None, field: str | None = None,
                max_bytes: int | None = None, subset: str | None = None) -> list[Document]:
    """The first documents of iter_corpus(name_or_path, ...) as a list (see iter_corpus for names,
    hf: specs and files), read no further than needed.

    form: "pages" | "rows" | "stream" | "raw" for names (default: the corpus's own, e.g. wikitext
    "pages", lambada "rows"; wikitext "raw" is wiki.test.raw byte for byte); for files and hf: specs
    "rows" (as read, the default), "stream" (joined by "\\n\\n") or "raw" (joined by "": a .txt
    file as it is). detokenize: apply lm-evaluation-harness's WikiText detokenizer to each document's text
    and keep the text as read in `original`, on which bytes/words/chars are counted. field: the text
    field of .jsonl/.parquet records (default "text", else "page") or of an hf: dataset (default
    "text", else its only string column); every value there must be a string (rows numbered from 1).
    subset: a part of pile or paloma.

    limit: at most `limit` documents. max_bytes: documents d_1..d_k, k the first index where
    n_bytes(d_1) + ... + n_bytes(d_k) >= max_bytes (all of them if the corpus holds fewer bytes):
    the document that reaches or crosses the bound is included whole, so the result holds at least
    max_bytes bytes and less than max_bytes + n_bytes(d_k). Both given: whichever stops first. The
    bounds apply to the documents of `form` (one document for "stream"). A result without text is an
    error.
    """
    _positive("limit", limit)
    _positive("max_bytes", max_bytes)
    docs, n_bytes = [], 0
    it = iter_corpus(name_or_path, form=form, data_dir=data_dir, detokenize=detokenize, field=field, subset=subset)
    try:
        while (limit is None or len(docs) < limit) and (max_bytes is None or n_bytes < max_bytes):
            doc = next(it, None)
            if doc is None:
                break
            docs.append(doc)
            n_bytes += doc.n_bytes if max_bytes is not None else 0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator's open file or stream is closed now, not when it is collected
    if not any(d.text for d in docs):
        raise ValueError(f"corpus {name_or_path!r} (form={form!r}, limit={limit}, max_bytes={max_bytes}) has no text: "
                         f"{len(docs)} documents, all empty")
    return docs


def __getattr__(name: str):
    """The table and WikiText's conventions live in lmloss/corpora.py; still importable from here."""
    if name in ("CORPORA", "wikitext_rows", "wikitext_pages", "wikitext_detokenize"):
        from lmloss import corpora

        return getattr(corpora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def takes_field(spec: str) -> bool:
    """Whether a text field (field= / --text-field) applies to this corpus spec: an hf: spec or a
    file of records (.jsonl, .parquet, ...); a named corpus has its own."""
    return spec.startswith("hf:") or spec.lower().endswith(RECORD_SUFFIXES)


def takes_subset(spec: str) -> bool:
    """Whether subset= / --subset applies to this corpus spec: a named corpus with parts (pile, paloma)."""
    from lmloss.corpora import ALIASES, CORPORA

    corpus = CORPORA.get(ALIASES.get(spec, spec))
    return corpus is not None and bool(corpus.subsets)


def check_corpus_options(specs: list[str], *, field: str | None, subset: str | None) -> None:
    """ValueError when --text-field or --subset is given but applies to none of the corpus specs
    (each option is passed only to the specs it applies to: takes_field, takes_subset)."""
    from lmloss.corpora import with_subsets

    if field is not None and not any(map(takes_field, specs)):
        raise ValueError(f"--text-field {field!r} picks a field of .jsonl/.parquet records or of an hf: "
                         f"dataset, and the corpora {specs} hold neither; drop --text-field or pass one")
    if subset is not None and not any(map(takes_subset, specs)):
        raise ValueError(f"--subset {subset!r} picks a part of a named corpus ({with_subsets()}), and the "
                         f"corpora {specs} name none; drop --subset or add one")
