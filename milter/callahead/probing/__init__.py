"""Asking the primary: what its replies mean (``verdict``), one SMTP session
(``session``, ``tls``), the session pool and its freshness rules (``pool``,
``freshness``), the engine with its breaker and budget per primary (``engine``,
``breaker``, ``budget``), and the one event loop every probe runs on (``loop``).

May import ``routing`` and ``base``. What the engine needs of a cache of valid
addresses is its own protocol (``validcache``), so that caching sits above it.
"""
