"""A test SMTP client that records the reply to every command, as a sender sees it."""

from __future__ import annotations

import smtplib
import socket
import time
import uuid
from dataclasses import dataclass, field

Reply = tuple[int, str]


@dataclass
class Transaction:
    """What the server answered in one SMTP transaction."""

    mail: Reply
    rcpt: dict[str, Reply] = field(default_factory=dict)
    rcpt_seconds: dict[str, float] = field(default_factory=dict)
    """Time from sending RCPT TO to its reply, per recipient."""
    data: Reply | None = None
    """None when no recipient was accepted (the client sent RSET instead of DATA)."""

    def code(self, rcpt: str) -> int:
        return self.rcpt[rcpt][0]


def make_message(sender: str, rcpts: list[str], subject: str = "test") -> tuple[str, bytes]:
    """A small message with a unique token in its body; returns (token, bytes)."""
    token = uuid.uuid4().hex
    text = (
        f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{token}@client.test>\r\n\r\n"
        f"token {token}\r\n"
    )
    return token, text.encode()


def _reply(code: int, message: bytes) -> Reply:
    return code, message.decode(errors="replace")


def send(
    port: int,
    sender: str,
    rcpts: list[str],
    body: bytes | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
) -> Transaction:
    """EHLO, MAIL FROM, one RCPT TO per recipient, then DATA with ``body`` if any
    recipient was accepted and a body is given (RSET otherwise), QUIT."""
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=timeout) as smtp:
        smtp.ehlo()
        tx = Transaction(mail=_reply(*smtp.mail(sender)))
        for rcpt in rcpts:
            start = time.monotonic()
            tx.rcpt[rcpt] = _reply(*smtp.rcpt(rcpt))
            tx.rcpt_seconds[rcpt] = time.monotonic() - start
        if body is not None and any(code == 250 for code, _ in tx.rcpt.values()):
            code, message = smtp.docmd("DATA")
            if code == 354:
                data = body.replace(b"\r\n.", b"\r\n..")
                if not data.endswith(b"\r\n"):
                    data += b"\r\n"
                smtp.send(data + b".\r\n")
                code, message = smtp.getreply()
            tx.data = _reply(code, message)
        else:
            smtp.rset()
    return tx


POLICY_REQUEST = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\n"
    "queue_id=POLICYQID\nrecipient={}\n\n"
)
"""A policy request for one RCPT as smtpd sends it (queue id POLICYQID in the log)."""


def ask_policy(port: int, recipient: str, timeout: float = 10.0) -> bytes:
    """One policy request on a new connection to 127.0.0.1:``port``; the whole answer
    (up to its empty line, or what came before the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(POLICY_REQUEST.format(recipient).encode())
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer
