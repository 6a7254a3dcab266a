"""The command-line options that choose the text and the windows, shared by `lmloss eval` and
`lmloss compare-models`: presets (flat TOML files in configs/, applied as argparse defaults so that the
command line wins), --add-bos rules, corpus lists, and the plan "chunks" check that runs before a model
loads. What each option means for the numbers is lmloss.windows' and lmloss.evaluate's to say.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lmloss.windows import PLANS

__all__ = ["CONFIGS", "ADD_BOS_RULES", "score_from_arg", "bos_in_tokens", "add_window_options", "apply_preset",
           "corpus_specs", "check_fills_a_chunk", "window_options"]

CONFIGS = Path(__file__).resolve().parent / "presets"  # links to the top-level configs/ (in a wheel: a copy)
ADD_BOS_RULES = ("no", "yes", "tokenizer", "lm-eval")


def score_from_arg(value: str) -> int | str:
    if value == "half":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'half', got {value!r}") from None


def bos_in_tokens(rule: str, tokenizer) -> tuple[bool, str]:
    """(does each document's token list start with BOS, why) under --add-bos `rule`.

    lm-eval: lm-evaluation-harness 0.4.13's HFLM with its default add_bos_token=None encodes each
    document with the tokenizer's own default (add_special_tokens=True), so the list starts with BOS
    exactly when the tokenizer adds one (Gemma, Llama: yes; GPT-2, SmolLM2: no); its add_bos_token=
    True/False is --add-bos yes/no. 0.4.13's HFLM special-cases no model family (older releases, and
    its sglang backend, forced BOS for "gemma" model types); it skips the BOS when the text itself
    starts with the BOS string, which lmloss does not follow. tokenizer: the same observed rule, as
    llama.cpp and the GPTQ loop apply it."""
    adds = bool(tokenizer.add_bos) and tokenizer.bos_id is not None
    if rule in ("lm-eval", "tokenizer"):
        who = ("lm-eval 0.4.13 rule (add_bos_token=None: the tokenizer's default)" if rule == "lm-eval"
               else "the tokenizer's own rule")
        return adds, f"{who}: the tokenizer {'adds' if adds else 'does not add'} BOS"
    if rule == "yes" and tokenizer.bos_id is None:
        raise ValueError(f"--add-bos yes, but tokenizer {tokenizer.name!r} has no BOS token; pass --add-bos no")
    return rule == "yes", f"--add-bos {rule}"


def add_window_options(a) -> None:
    """The options that choose the text and the windows, shared by lmloss eval and compare-models
    (`a` is a parser's add_argument); presets set their defaults."""
    a("--preset", help=f"configs/<name>.toml: {', '.join(sorted(f.stem for f in CONFIGS.glob('*.toml')))}")
    a("--plan", choices=PLANS, default="lm-eval", help="window plan (lmloss.windows)")
    a("--form", help="corpus form: pages, rows, stream or raw (default: the corpus's own)")
    a("--detokenize", action=argparse.BooleanOptionalAction, default=False,
      help="apply lm-evaluation-harness's WikiText detokenizer; counts stay on the original text")
    a("--data-dir", default=os.environ.get("LMLOSS_DATA_DIR"),
      help="offline corpora folder (default: $LMLOSS_DATA_DIR)")
    a("--max-length", type=int, help="model inputs per window (default: the model's context length; "
      "compare-models KL mode: the shorter of the two)")
    a("--stride", type=int, help="sliding plan: how far windows move (default max_length // 2)")
    a("--bos-every-window", action=argparse.BooleanOptionalAction, default=False,
      help="put BOS (else EOS) at the start of every window; plan chunks: write BOS over each chunk's first "
           "token when the token list starts with BOS (llama.cpp)")
    a("--add-bos", choices=ADD_BOS_RULES, default="no",
      help="does each document's token list start with BOS (then scored like any token)? no; yes; tokenizer: "
           "when the tokenizer adds BOS (llama.cpp, the GPTQ loop, the HF guide); lm-eval: lm-evaluation-harness "
           "0.4.13's rule, the same (its add_bos_token=None; yes/no are its True/False)")
    a("--score-from", type=score_from_arg, help="plan chunks: predictions at the start of each chunk that are "
      "context only: N, or 'half' for max_length // 2 (llama.cpp's); default 0 (the GPTQ loop)")
    a("--chunks", type=int, help="plan chunks: score only the first K chunks (llama-perplexity --chunks K)")


def apply_preset(parser: argparse.ArgumentParser, argv) -> None:
    """A --preset's keys become the parser's defaults (the command line wins)."""
    known, _ = parser.parse_known_args(argv)
    if not known.preset:
        return
    path = Path(known.preset) if known.preset.endswith(".toml") else CONFIGS / f"{known.preset}.toml"
    if not path.is_file():
        names = ", ".join(sorted(f.stem for f in CONFIGS.glob("*.toml")))
        parser.error(f"unknown preset {known.preset!r}: no {path}; presets: {names}")
    preset = tomllib.loads(path.read_text())
    unknown = sorted(set(preset) - {a.dest for a in parser._actions})
    if unknown:
        parser.error(f"preset {path} has unknown keys {unknown}; keys are option names with '_'")
    parser.set_defaults(**preset)


def corpus_specs(dataset: str) -> list[str]:
    """--dataset as a list of corpus specs: "wikitext,ptb,hf:allenai/c4:en" -> three."""
    specs = [spec.strip() for spec in dataset.split(",") if spec.strip()]
    twice = sorted({spec for spec in specs if specs.count(spec) > 1})
    if twice:  # the pooled row would count the same documents twice
        raise ValueError(f"--dataset names {twice} more than once; name each corpus once")
    if not specs:
        raise ValueError(f"--dataset {dataset!r} names no corpus; pass a name, an hf: spec or a file path "
                         "(a comma list for several)")
    return specs


def _token_count_reaching(tokenizer, text: str, need: int) -> int:
    """len(encode_document(tokenizer, text)) where that is below `need`; where it is not, a count
    >= need that may come from a prefix of the text only (16 * need characters, then 4x longer), so
    that a long text is not tokenized a second time just to learn that it fills a chunk. A prefix
    counts only with a margin of need // 4 + 16 tokens: a cut changes the tokens at the cut alone."""
    from lmloss.encode import encode_document

    chars = 16 * need
    while chars < len(text):
        n = len(encode_document(tokenizer, text[:chars]))
        if n >= need + need // 4 + 16:
            return n
        chars *= 4
    return len(encode_document(tokenizer, text))


def check_fills_a_chunk(args, spec: str, tokenizer, docs, max_length: int, bos_in_tokens: bool) -> None:
    """Plan "chunks" scores whole chunks of max_length tokens only: ValueError, before the model is
    loaded, unless some document's token list (BOS included when bos_in_tokens) holds one. The
    documents are tokenized until one does (see _token_count_reaching)."""
    longest = 0
    for doc in docs:
        longest = max(longest, _token_count_reaching(tokenizer, doc.text, max_length - bos_in_tokens)
                      + bos_in_tokens)
        if longest >= max_length:
            return
    fixes = [f"--max-length {longest} or less"] if longest >= 2 + (args.score_from if isinstance(
        args.score_from, int) else 0) else []
    if len(docs) > 1 and args.form != "stream":
        fixes.append("--form stream (the documents joined into one text, as llama.cpp and the GPTQ loop read a file)")
    if args.limit is not None or args.max_bytes is not None:
        fixes.append("a larger --limit / --max-bytes")
    raise ValueError(f"--dataset {spec}: plan 'chunks' scores whole chunks of {max_length} tokens (--max-length) "
                     f"and drops the rest, but the longest of its {len(docs)} documents has {longest} tokens"
                     f"{' (BOS included)' if bos_in_tokens else ''}, so no token would be scored. Pass "
                     + ", or ".join(fixes + ["a longer text"]))


def window_options(args, tokenizer) -> dict:
    """The evaluate() keywords that --plan, --add-bos, --bos-every-window, --score-from and --chunks
    decide, with the reason for the BOS choice (a note in the results)."""
    on, why = bos_in_tokens(args.add_bos, tokenizer)
    chunks = args.plan == "chunks"
    # llama.cpp writes BOS over each chunk's first token exactly when its token list starts with BOS.
    prefix_id = tokenizer.bos_id if chunks and args.bos_every_window and on else None
    return dict(bos_in_tokens=on, bos_note=f"BOS {'starts' if on else 'does not start'} each document's "
                f"token list ({why})", prefix_id=prefix_id, every_window=args.bos_every_window and not chunks,
                score_from=None, max_chunks=args.chunks)
