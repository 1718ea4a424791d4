"""What answers the outside: the milter (``adapter``), the policy service
(``policyservice``), the judge both ask the core through (``judge``), the admin socket
(``admin``) and the careful unix-socket helper they share (``unixsocket``), and the
Prometheus metrics (``metrics``) that front ends count into and operators scrape.

May import ``core`` and everything below it. Thin: they parse what Postfix hands them,
ask the core, and turn its ``Decision`` into their protocol's answer.
"""
