"""Self-signed certificates for test servers, made with the ``openssl`` command line.

``self_signed(dir)`` writes ``<cn>.crt`` and ``<cn>.key`` (an EC P-256 key, no
passphrase, ten years, subjectAltName ``DNS:<cn>``) into ``dir`` once and returns the
same paths on every later call, in this process or another one. ``server_context``
turns them into a server-side ``ssl.SSLContext``; ``client_context`` makes the matching
client side (verifying against the certificate, or not verifying at all).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
from pathlib import Path

__all__ = ["client_context", "self_signed", "server_context"]

OPENSSL_TIMEOUT = 60.0

_lock = threading.Lock()
_made: dict[tuple[Path, str], tuple[Path, Path]] = {}


def self_signed(tmpdir: Path, cn: str = "scripted.test") -> tuple[Path, Path]:
    """Return ``(cert, key)`` for a self-signed certificate for ``cn`` in ``tmpdir``.

    Made with ``openssl req -x509`` the first time, reused afterwards (the files are
    written under temporary names and renamed, so a concurrent caller never reads half
    a file). Raises ``RuntimeError`` with openssl's output if openssl fails.
    """
    if not cn or "/" in cn or cn.startswith("."):
        raise ValueError(f"unusable common name for a file name: {cn!r}")
    directory = Path(tmpdir).resolve()
    cert = directory / f"{cn}.crt"
    key = directory / f"{cn}.key"
    with _lock:
        cached = _made.get((directory, cn))
        if cached is not None and cached[0].exists() and cached[1].exists():
            return cached
        if not (cert.exists() and key.exists()):
            _generate(directory, cn, cert, key)
        _made[(directory, cn)] = (cert, key)
        return cert, key


def _generate(directory: Path, cn: str, cert: Path, key: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{os.getpid()}.{threading.get_ident()}"
    tmp_cert = cert.with_name(cert.name + suffix)
    tmp_key = key.with_name(key.name + suffix)
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        f"/CN={cn}",
        "-addext",
        f"subjectAltName=DNS:{cn}",
        "-keyout",
        str(tmp_key),
        "-out",
        str(tmp_cert),
    ]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=OPENSSL_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"openssl failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )
        tmp_key.chmod(0o600)
        # Key first: whoever sees the certificate may rely on the key being there.
        tmp_key.replace(key)
        tmp_cert.replace(cert)
    finally:
        for leftover in (tmp_cert, tmp_key):
            leftover.unlink(missing_ok=True)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context presenting ``cert``/``key``; asks for no client cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def client_context(cert: Path | None = None) -> ssl.SSLContext:
    """A client-side TLS context. With ``cert``: trusts exactly that certificate and
    checks the host name against it. Without: verifies nothing (like an MTA's
    opportunistic TLS)."""
    if cert is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(cert))
