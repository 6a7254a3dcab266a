"""lmloss.hub: the reachability probe, and what the loaders do with its answer. No test reaches the
network: socket.create_connection is replaced, and transformers/datasets calls are spied on."""
import socket

import pytest

import lmloss
import lmloss.hub as hub
from lmloss.models import peek_config


@pytest.fixture
def probe(monkeypatch):
    """Replace the TCP probe: returns the list of addresses it was asked for; set probe.ok to answer."""
    for var in hub._OFFLINE_VARS + hub._PROXY_VARS + ("HF_ENDPOINT",):
        monkeypatch.delenv(var, raising=False)
    hub._connects.cache_clear()
    calls = []

    class Conn:
        def close(self):
            pass

    def connect(address, timeout):
        calls.append((address, timeout))
        if not connect.ok:
            raise socket.gaierror(-2, "Name or service not known")
        return Conn()

    connect.ok = False
    connect.calls = calls
    monkeypatch.setattr(socket, "create_connection", connect)
    yield connect
    hub._connects.cache_clear()


def test_probe_answers_and_is_asked_once(probe):
    assert hub.hub_reachable() is False and hub.hub_reachable() is False
    assert probe.calls == [(("huggingface.co", 443), hub.PROBE_TIMEOUT_S)]  # once per process and endpoint
    hub._connects.cache_clear()
    probe.ok = True
    assert hub.hub_reachable() is True


def test_probe_follows_hf_endpoint(probe, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    probe.ok = True
    assert hub.hub_reachable() is True
    assert probe.calls[-1][0] == ("mirror.example", 8080)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    hub.hub_reachable()
    assert probe.calls[-1][0] == ("hf-mirror.example", 443)
    n = len(probe.calls)
    for odd in ("hf-mirror.example", "http://[::1", "http://host:port"):  # not probed: the libraries say what is wrong
        monkeypatch.setenv("HF_ENDPOINT", odd)
        assert hub.hub_reachable() is True and len(probe.calls) == n


@pytest.mark.parametrize("var, value, expected", [("HF_HUB_OFFLINE", "1", False), ("TRANSFORMERS_OFFLINE", "yes", False),
                                                  ("HF_HUB_OFFLINE", "0", None), ("HTTPS_PROXY", "http://p:3128", True)])
def test_offline_mode_and_proxies_are_not_probed(probe, monkeypatch, var, value, expected):
    monkeypatch.setenv(var, value)
    if expected is None:  # "0" is not offline mode: the probe decides (it fails here)
        assert hub.hub_reachable() is False and len(probe.calls) == 1
    else:
        assert hub.hub_reachable() is expected and probe.calls == []
    assert ("offline mode" in hub.unreachable_note()) == (expected is False)


def _spy(monkeypatch, target, name):
    """Replace target.name by a function recording its keyword arguments and raising OSError, as
    transformers does for a name that is neither on a reachable hub nor in the cache."""
    seen = []

    def fake(*args, **kwargs):
        seen.append((args, kwargs))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(target, name, fake)
    return seen


def test_model_and_tokenizer_from_the_cache_only_when_unreachable(probe):
    import transformers

    mp = pytest.MonkeyPatch()
    try:
        models = _spy(mp, transformers.AutoModelForCausalLM, "from_pretrained")
        configs = _spy(mp, transformers.AutoConfig, "from_pretrained")
        toks = _spy(mp, transformers.AutoTokenizer, "from_pretrained")
        with pytest.raises(ValueError, match=r"in the local cache only \(the hub \(https://huggingface.co\) did "
                                             r"not accept a connection within 3 s\)"):
            lmloss.load_model("no-such-org/no-such-model-hub-test")
        with pytest.raises(ValueError, match="in the local cache only"):
            peek_config("no-such-org/no-such-model-hub-test")
        with pytest.raises(ValueError, match="so only the local cache was tried"):
            lmloss.load_tokenizer("no-such-org/no-such-model-hub-test")
        assert models and configs and toks
        assert all(kw.get("local_files_only") is True for _, kw in models + configs + toks)
        # reachable: the hub is asked as before (no local_files_only)
        hub._connects.cache_clear()
        probe.ok = True
        with pytest.raises(ValueError, match="tried the Hugging Face Hub name 'no-such-org/no-such-model-hub-x'"
                                             " and got"):
            lmloss.load_model("no-such-org/no-such-model-hub-x")
        assert "local_files_only" not in models[-1][1]
    finally:
        mp.undo()


def test_hub_corpus_not_opened_when_unreachable(probe, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = _spy(monkeypatch, datasets, "load_dataset")
    with pytest.raises(ValueError, match=r"(?s)load_dataset\('Salesforce/wikitext', 'wikitext-2-raw-v1', streaming=True\) "
                                         r"not tried: its rows stream from the hub, and the hub .* did not accept "
                                         r"a connection.*LMLOSS_DATA_DIR"):
        lmloss.load_corpus("wikitext", data_dir=None)
    assert calls == []
