"""Shared fixtures. Offline assets come from $LMLOSS_ASSETS (the Makefile sets it to ../shared/assets);
tests that need them skip when it is unset, except under CI, where a missing asset is a failure."""
import os
from pathlib import Path

import pytest
import torch

# Tests never reach the network. huggingface_hub reads these once, when it is first imported, so they
# are set here, at collection, not in a fixture.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
# Converted GGUF files (lmloss.gguf_cache) go to a folder of this checkout, kept between runs (a
# second run loads SmolLM2 in seconds), never to ~/.cache; subprocesses of tests inherit it.
os.environ.setdefault("LMLOSS_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "lmloss-test"))


def _assets_dir() -> Path | None:
    env = os.environ.get("LMLOSS_ASSETS")
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
    return guess if guess.is_dir() else None


@pytest.fixture(scope="session")
def assets() -> Path:
    d = _assets_dir()
    if d is None or not d.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"offline assets not found (LMLOSS_ASSETS={os.environ.get('LMLOSS_ASSETS')!r})")
        pytest.skip("offline assets not found: set LMLOSS_ASSETS to the shared assets folder")
    return d


@pytest.fixture(scope="session", autouse=True)
def _offline_env():
    """tiktoken reads its cache folder from the environment at each load."""
    d = _assets_dir()
    if d is not None:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(d / "tokenizers" / "tiktoken_cache"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random GPT-2-shaped model (GPT-2's 50257-class vocabulary), saved as a local folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=32, n_layer=1, n_head=2)).save_pretrained(path)
    return str(path)


SMOLLM2 = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"  # under the assets folder


@pytest.fixture(scope="module")
def smollm2(assets):
    """(LoadedModel, Tokenizer) of SmolLM2-135M-Instruct Q4_1 (GGUF, dequantized to float32 on the CPU),
    loaded once per test module that asks for it (about 0.5 GiB, freed after the module).
    tests/test_tokenizers.py overrides it with a fixture of the tokenizer alone."""
    import lmloss

    path = str(assets / SMOLLM2)
    return lmloss.load_model(path, device="cpu"), lmloss.load_tokenizer(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo rendezvous (MASTER_PORT) of spawned ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def triton_interpreter():
    """run(test_file, *pytest_args): its Triton cases ("triton and not interpreter") in a fresh pytest
    process under TRITON_INTERPRET=1 (which must be set before triton is imported), on the CPU;
    fails with that process's output unless they pass."""
    import subprocess
    import sys

    pytest.importorskip("triton")

    def run(test_file: str, *args: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file,
                               "-k", "triton and not interpreter", *args], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and " failed" not in proc.stdout

    return run
