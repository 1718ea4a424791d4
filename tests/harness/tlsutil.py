"""TLS for test servers: one throwaway certificate authority per process, made with
``trustme`` (nothing is written to disk, no ``openssl`` command runs).

``server_context(*identities)`` is a server-side ``ssl.SSLContext`` presenting a
certificate issued by that CA (an ECDSA key; the identities, host names or IP
addresses, in its subjectAltName; by default ``scripted.test`` and ``127.0.0.1``, so
that a client connecting to the loopback address can check it). ``client_context()``
is the matching client side: it trusts that CA, and only it, and checks the host name.
"""

from __future__ import annotations

import functools
import ssl

import trustme

__all__ = ["DEFAULT_IDENTITIES", "certificate_authority", "client_context", "server_context"]

DEFAULT_IDENTITIES = ("scripted.test", "127.0.0.1")


@functools.cache
def certificate_authority() -> trustme.CA:
    """The CA that issues every server certificate of this process."""
    return trustme.CA(organization_name="callahead tests")


def server_context(*identities: str) -> ssl.SSLContext:
    """A server-side context presenting a certificate for ``identities`` (default
    ``DEFAULT_IDENTITIES``) issued by the test CA; asks for no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf = certificate_authority().issue_cert(*(identities or DEFAULT_IDENTITIES))
    leaf.configure_cert(context)
    return context


def client_context() -> ssl.SSLContext:
    """A client-side context that trusts the test CA (and nothing else) and checks the
    host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    certificate_authority().configure_trust(context)
    return context
