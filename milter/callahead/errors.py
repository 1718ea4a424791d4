"""callahead's errors: one family, each caught where it can be decided.

* ``ConfigError`` (config.py): a bad variable; the command exits 78.
* ``RouteError`` (routes.py): a route or nexthop that cannot be used (a ConfigError's
  cause).
* ``UnsendableAddress`` (address.py): an address no SMTP command may carry; never put
  on the wire, answered with the tempfail action.
* ``SessionLost`` / ``SessionFailed`` (session.py): a probe session died or could not
  open; the engine retries or turns it into an undecided result.
"""

from __future__ import annotations


class CallaheadError(Exception):
    """The base of every error callahead raises on purpose."""
