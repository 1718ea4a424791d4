"""STARTTLS for probes, named as Postfix's ``smtp_tls_security_level`` names it."""

from __future__ import annotations

import enum
import ssl


class TlsMode(enum.Enum):
    """Named as Postfix's smtp_tls_security_level names them."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"


def unverified_tls_context() -> ssl.SSLContext:
    """Opportunistic TLS, as Postfix's ``may`` and ``encrypt``: encrypt, don't verify."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
