"""The Engine API client: where the engine is (DOCKER_HOST), one client per engine, and
why a request failed, in words.
"""

from __future__ import annotations

import os
import re
import threading

from ...errors import Unavailable, UnsupportedHost

API_VERSION = "1.41"

#: The first API version whose exec start takes ConsoleSize (a tty's window from its start).
CONSOLE_SIZE_API_VERSION = "1.42"


DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


#: How long the engine may take to answer one request, in seconds.
REQUEST_TIMEOUT_S = 60


def engine_url(explicit: str | None = None) -> str:
    """The engine to use: the explicit URL, else $DOCKER_HOST, else the standard socket."""
    return explicit or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _sdk():
    try:
        import docker  # noqa: PLC0415 (optional dependency, imported on use)
    except ImportError:
        raise UnsupportedHost(
            "the docker backend needs the Docker SDK for Python: pip install 'corral[docker]'"
        ) from None
    return docker


_clients: dict[str, object] = {}


_clients_lock = threading.Lock()


def client(url: str | None = None):
    """A connected low-level API client for the engine at url (cached per URL).

    Raises:
        Unavailable: no engine answers there.
        UnsupportedHost: the docker SDK is not installed.
    """
    url = engine_url(url)
    with _clients_lock:
        api = _clients.get(url)
    if api is not None:
        return api
    docker = _sdk()
    try:
        api = docker.APIClient(base_url=url, version=API_VERSION, timeout=REQUEST_TIMEOUT_S)
        api.ping()
    except Exception as exc:  # the SDK raises requests/urllib3/OS errors alike
        raise Unavailable(
            f"no Docker engine answers at {url} ({_reason(exc)}); start dockerd, or point "
            f"Corral at one with DOCKER_HOST or --docker-host"
        ) from None
    with _clients_lock:
        _clients.setdefault(url, api)
        return _clients[url]


_console_size: dict[str, bool] = {}


def sizes_consoles(api) -> bool:
    """Whether the engine behind api sets a tty exec's window at start (API >= 1.42,
    Docker 23); asked once per engine. Older engines start the pty at 0x0."""
    url = api.base_url
    if url not in _console_size:
        try:
            version = str(api.version(api_version=False).get("ApiVersion", "0.0"))
            major, minor = (int(x) for x in version.split(".")[:2])
        except Exception:  # an engine that does not say is taken to be an old one
            major, minor = 0, 0
        _console_size[url] = (major, minor) >= (1, 42)
    return _console_size[url]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for pattern in (r"\[Errno \d+\] [^')\]]+", r"No such file or directory",
                    r"Connection refused"):
        m = re.search(pattern, text)
        if m:
            return m.group(0)
    return text[:200]


def _is_local(url: str) -> bool:
    """Whether the engine runs on this host (its pids and cgroups are ours to see)."""
    return url.startswith("unix://") or url.startswith("/")
