"""Asking the primaries, within bounds: the engine (``engine``: coalescing, slots, the
cache write; ``failover``: one probe over a domain's nexthops; ``primaries``: what is
kept and learnt per primary, bounded; ``enginetypes``: its settings and neighbours'
types), the session pool and its freshness rules (``pool``, ``freshness``), the
breaker and the budget per primary (``breaker``, ``budget``), and the one event loop
every probe runs on (``loop``).

May import ``smtp``, ``routing`` and ``base``. What the engine needs of a cache of valid
addresses is its own protocol (``validcache``), so that caching sits above it.
"""
