"""Cheap TLS contexts for the test process: the CA store is looked up lazily.

Every httpx (and openai) client builds a verifying TLS context when it is created,
even for the plain-http loopback URLs that are all the tests use. Given a CA *file*
(``SSL_CERT_FILE``, or certifi's bundle by default), OpenSSL parses every certificate
in it at once: 30-40 ms of CPU per client, and the suite makes about 500 clients
(each ``httpx.post``, each gateway, each SDK client). Given a hashed CA *directory*
(``SSL_CERT_DIR``), OpenSSL reads a certificate only when a handshake needs it, so a
client costs about 1 ms. Verification stays on, against the same system CAs.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager


@contextmanager
def lazy_ca_store(environ: MutableMapping[str, str] = os.environ) -> Iterator[None]:
    """Point ``SSL_CERT_DIR`` at the system's CA directory and drop ``SSL_CERT_FILE``.

    Nothing changes where the system has no CA directory (certifi's file is used then).
    """
    capath = ssl.get_default_verify_paths().capath
    if capath is None or not os.path.isdir(capath):
        yield
        return
    saved = {name: environ.get(name) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    environ.pop("SSL_CERT_FILE", None)
    environ["SSL_CERT_DIR"] = capath
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
