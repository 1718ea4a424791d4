"""The floor for any pymilter milter: answers CONTINUE to every recipient and does nothing
else, negotiated like callahead (only the RCPT, DATA and end-of-message callbacks).

``python -m bench.trivial_milter inet:PORT@127.0.0.1`` runs it until SIGTERM. Case "2t"
of the warm workload measures it, so that what callahead costs can be told apart from
what pymilter and libmilter cost any milter (a thread per SMTP connection, the GIL).
"""

from __future__ import annotations

import sys

import Milter


class TrivialMilter(Milter.Base):  # type: ignore[misc]
    def negotiate(self, opts: list[int]) -> int:
        self._actions, offered, _, _ = opts
        opts[1] = self._protocol = offered & ~self.protocol_mask()
        opts[2] = opts[3] = 0
        return int(Milter.CONTINUE)

    def envrcpt(self, to: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    def data(self) -> int:
        # Without it, Postfix's DATA macros get no reply over TCP and every message
        # waits for a delayed ACK (44 ms measured; docs/design.md).
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        return int(Milter.CONTINUE)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.trivial_milter inet:PORT@HOST", file=sys.stderr)
        return 64
    Milter.factory = TrivialMilter
    Milter.runmilter("bench-trivial", argv[0], timeout=300)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
