"""One TLS context for every HTTP client of a run, built while Python imports the rest.

Loading the certificate store takes 25–60 ms, and every HTTP client (one per LLM server, one
for Danbooru) would otherwise load its own before the first request can leave. The load
releases the GIL, so `prepare()` starts it in a thread at startup, beside the import of the
OpenAI SDK, and `context()` hands the one result to every client. It honours SSL_CERT_FILE
and SSL_CERT_DIR like the HTTP client's own default.
"""
from __future__ import annotations

import os
import ssl
import threading
from concurrent.futures import Future
from typing import Optional

from tagcaption.errors import ConfigError

_context: Optional[Future] = None
_lock = threading.Lock()


def prepare() -> None:
    """Start building the context in the background, once."""
    global _context
    with _lock:
        if _context is not None:
            return
        _context = Future()
    threading.Thread(target=_build, args=(_context,), name="tls-context", daemon=True).start()


def _build(future: Future) -> None:
    try:
        import httpx2

        future.set_result(httpx2.create_ssl_context())
    except BaseException as exc:  # handed to whoever asks for the context
        future.set_exception(exc)


def context() -> ssl.SSLContext:
    """The context; a certificate store that cannot be loaded is a setup problem (ConfigError)."""
    prepare()
    try:
        return _context.result()
    except (ssl.SSLError, OSError) as exc:
        where = next((f"{name}={os.environ[name]}" for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")
                      if os.environ.get(name)), "the system's certificate store")
        raise ConfigError(f"cannot load the TLS certificates from {where}: {exc}") from None


def context_for(url: str) -> ssl.SSLContext:
    """The shared context for a client of `url`. A plain-http server needs none, so there a
    certificate store that cannot be loaded is no reason to stop: the client gets the
    system's own store instead (used only if the server redirects to https)."""
    try:
        return context()
    except ConfigError:
        if url.lower().startswith("https:"):
            raise
        import httpx2

        return httpx2.create_ssl_context(trust_env=False)
