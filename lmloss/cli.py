"""The `lmloss` command (and `python -m lmloss`): one entry point, a subcommand per tool.

    lmloss eval --model gpt2 --dataset wikitext
    lmloss compare-tokenizers --tokenizers gpt2,cl100k_base --dataset wikitext
    lmloss compare-models --reference A --model B --dataset wikitext    # KL divergence
    lmloss compare-models --models A,B,C --dataset wikitext             # paired bits per byte
"""

from __future__ import annotations

import sys

__all__ = ["main", "run_reporting_errors", "setup_process"]

COMMANDS = {  # name -> (module, what it does)
    "eval": ("lmloss.cli_eval", "evaluate a model on a corpus: perplexities and bits per byte"),
    "compare-tokenizers": ("lmloss.cli_compare", "compare tokenizers (and models) on corpora"),
    "compare-models": ("lmloss.cli_compare_models", "compare models: KL against a reference, paired bits per byte"),
    "cache": ("lmloss.cli_cache", "list or clear the converted GGUF models (lmloss.gguf_cache)"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch `lmloss COMMAND ARGS...` to COMMAND's main(ARGS); its exit code is returned."""
    import importlib

    if argv is None:  # the process's own command line: this process is lmloss's
        try:
            setup_process()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:20s} {what}" for name, (_, what) in COMMANDS.items())
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"lmloss: unknown command {argv[0]!r}", file=stream)
        print(f"usage: lmloss COMMAND [options]   (lmloss COMMAND --help for its options)\n\ncommands:\n{listing}",
              file=stream)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


def setup_process() -> None:
    """What a process that runs an lmloss command sets up first (not a user's process that imports
    lmloss, nor a test calling main(argv)): freed memory stays mapped (lmloss/malloc.py)."""
    from lmloss import malloc

    malloc.keep_freed_memory()


def run_reporting_errors(run, args, *, own_process: bool = False) -> int:
    """run(args) as a command's exit code: 0 done; 2 for a bad input (ValueError, OSError,
    ImportError), 1 for anything else, each as one line "error: ..." on stderr with no traceback
    unless args.debug; 130 when interrupted (the interruption's message says what was saved).
    own_process: main() was called with no argv, so this process is the command's (setup_process)."""
    try:
        if own_process:
            setup_process()
        run(args)
    except (ValueError, OSError, ImportError) as err:  # a user's input: a message, not a traceback
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # not the input's fault: still one line, the traceback on request
        if args.debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {err}\n(no results were written; rerun with "
              "--debug for the traceback and report it)", file=sys.stderr)
        return 1
    return 0
