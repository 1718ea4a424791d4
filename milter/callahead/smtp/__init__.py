"""One SMTP session with a primary, and what its replies mean: the probe dialogue
(``session``), its opening (``handshake``: EHLO/HELO, STARTTLS per ``tls``), its
transcript (``dialogue``), the evidence rules for a rejection (``evidence``), the
classification table (``classify``) and the verdict vocabulary every layer above uses
(``verdict``); ``smtpcompat`` keeps Debian 12's aiosmtplib working.

May import ``routing`` and ``base``.
"""
