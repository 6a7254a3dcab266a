"""Whether the Hugging Face Hub answers, asked once per process before lmloss hands a hub name to
transformers or datasets.

Without a network, those libraries retry each request with back-off: 20-50 s before their error (an unknown
model name offline: 52 s, of which 48 s waiting). When the hub's host does not accept a connection within a
few seconds, lmloss asks transformers for its local cache only (`local_files_only=True`: a cached model still
loads, anything else fails at once) and does not start a streamed hub dataset, whose files would have to come
from the hub. Offline mode set by the user (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) counts as unreachable
without a probe; behind a proxy (HTTPS_PROXY and the like) the hub counts as reachable, since a direct
connection would say nothing about the proxied one.

    hub_reachable()      False when offline mode is set or the hub's host refuses or ignores a connection
    unreachable_note()   why it said False, for an error message
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_DEFAULT_ENDPOINT = "https://huggingface.co"


def offline_mode() -> bool:
    """Whether the user set Hugging Face's offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE true)."""
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_VARS)


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT, default https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT


def hub_reachable() -> bool:
    """False when offline mode is set, or when a TCP connection to endpoint()'s host and port fails within
    PROBE_TIMEOUT_S seconds (asked once per process and endpoint); True otherwise, and always behind a proxy."""
    if offline_mode():
        return False
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    return _connects(endpoint(), PROBE_TIMEOUT_S)


@functools.lru_cache(maxsize=None)
def _connects(url: str, timeout: float) -> bool:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:  # "http://[::1", "http://host:port"
        host = None
    if not host:
        return True  # not an address this probe understands: let the libraries try it, and say what is wrong
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:  # no DNS, refused, unreachable, timed out
        return False
    return True


def unreachable_note() -> str:
    """Why hub_reachable() said False, for an error message to add."""
    if offline_mode():
        return "offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    return f"the hub ({endpoint()}) did not accept a connection within {PROBE_TIMEOUT_S:g} s"
