"""callahead's errors: one family, each caught where it can be decided.

* ``ConfigError`` (config.py): a bad variable; the command exits 78.
* ``RouteError`` (routes.py): a route or nexthop that cannot be used (a ConfigError's
  cause).
* ``UnsendableAddress`` (address.py): an address no SMTP command may carry; never put
  on the wire, answered with the tempfail action.
* ``SessionLost`` / ``SessionFailed`` (session.py): a probe session died or could not
  open; the engine retries or turns it into an undecided result.
* ``RouteUnavailable`` (routes.py), ``PostfixConfigError`` (postfixmaps.py),
  ``NoRecords`` / ``DnsFailure`` (resolve.py): a route that cannot be told now (an
  undecided answer, never a reject), or a Postfix configuration that cannot be read
  (exit 78 at start; the old routes stay on SIGHUP).
* ``CacheFileError`` (cachefile.py): the cache file cannot be read or written; logged,
  never fatal.
* ``AdminError`` / ``AdminUnavailable`` (admin.py): the admin socket cannot be set up
  (serve goes on without it) or no serve answers on it (the command exits 69).
* ``UnixSocketError`` (unixsocket.py): a unix socket path that must not be taken
  (something that is not a socket, or a socket that answers); the admin socket goes
  off, the policy service exits 69.
* ``RequestError`` (policyrequest.py): a policy request that cannot be Postfix's; the
  connection is closed.
* ``JournalUnavailable`` (maillog/journal.py): ``CALLAHEAD_MAILLOG=journal`` without
  python3-systemd or a readable journal; logged, the backscatter meter stays off.
"""

from __future__ import annotations


class CallaheadError(Exception):
    """The base of every error callahead raises on purpose."""
