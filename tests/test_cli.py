"""The installed `lmloss` command and `python -m lmloss`: one entry point over the same parsers as
scripts/eval.py and scripts/compare_tokenizers.py."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmloss import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("command, option", [("eval", "--max-length"), ("compare-tokenizers", "--tokenizers")])
def test_module_and_scripts_show_the_same_parser(command, option):
    via_module = _run("-m", "lmloss", command, "--help")
    script = {"eval": "scripts/eval.py", "compare-tokenizers": "scripts/compare_tokenizers.py"}[command]
    via_script = _run(script, "--help")
    assert via_module.returncode == 0 == via_script.returncode, via_module.stderr + via_script.stderr
    assert option in via_module.stdout and f"usage: lmloss {command}" in via_module.stdout
    assert via_script.stdout == via_module.stdout


def test_the_console_script_is_installed_beside_the_interpreter():
    exe = shutil.which("lmloss", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("lmloss is not installed in this environment (pip install -e . installs it)")
    out = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage: lmloss eval" in out.stdout


def test_unknown_or_missing_command_lists_the_commands(capsys):
    assert cli.main([]) == 2 and "compare-tokenizers" in capsys.readouterr().err
    assert cli.main(["evaluate"]) == 2 and "unknown command 'evaluate'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0 and "eval" in capsys.readouterr().out
