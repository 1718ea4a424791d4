"""Test harness: stand-in primaries, throwaway Postfix instances and wait helpers.

Not only for the tests: the demo (``tests/demo.py``, ``./dev demo``) and the benchmark
(``bench/``, ``./dev bench``) build their stacks from it too. It is imported as
``tests.harness`` from the repository root (``./dev`` runs everything from there); it
is not part of the installed ``callahead`` package and needs the test dependencies.

Modules:

- :mod:`tests.harness.waiting` -- ``wait_for`` / ``wait_until``: poll a condition instead
  of sleeping (in a thread / in a coroutine).
- :mod:`tests.harness.ports` -- ``free_port``: a TCP port on 127.0.0.1 never handed out
  twice in one process; ``read_until``: a server's answer on a plain socket.
- :mod:`tests.harness.threaded` -- ``ThreadedServer``: the thread-and-loop base of the
  servers below (and why it is not aiosmtpd's ``Controller``).
- :mod:`tests.harness.primary` -- ``Primary`` (an aiosmtpd primary MX that knows its
  users and records every probe and delivery) and ``SilentServer`` (a primary that
  accepts TCP and never answers).
- :mod:`tests.harness.postfix` -- ``PostfixInstance`` (a real Postfix under a temp dir)
  and the ``main.cf`` builders ``backup_mx_main_cf`` / ``primary_main_cf``.
- :mod:`tests.harness.fixtures` -- pytest fixtures (``tmp_workdir``, ``scripted``).
- :mod:`tests.harness.scripted` -- ``ScriptedServer``: the one scripted SMTP server (the
  primary of the probe unit tests and of the fault matrix); answers each stage with the
  reply lines its ``Script`` says (faults, delays, hang-ups, an RCPT hook, STARTTLS good
  or broken) and records every line as received, per session and over TLS or not.
- :mod:`tests.harness.tlsutil` -- a throwaway CA (``trustme``): server certificates it
  issues and client contexts that trust it.
- :mod:`tests.harness.callahead_process` -- ``callahead serve`` as a real process.
- :mod:`tests.harness.client` -- an SMTP client that records every reply and its time.
- :mod:`tests.harness.process` -- ``ManagedProcess``: a process started until ready,
  stopped with SIGTERM then SIGKILL.
- :mod:`tests.harness.lifecycle` -- ``StartStop`` (``with`` starts and stops every server
  above) and the maildir readers they share.
- :mod:`tests.harness.redis` -- ``RedisServer``: a throwaway ``redis-server`` on a free
  loopback port, no persistence, stopped and started again on the same port.
- :mod:`tests.harness.peers` -- ``EximPrimary`` and ``OpenSmtpdPrimary``: peers' MTAs as
  primaries, run from Debian's packages unpacked with ``dpkg -x`` into ``.cache/``.
"""
