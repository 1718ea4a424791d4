"""What callahead remembers: valid addresses in the local TTL cache (``cache``) and its
snapshot file (``cachefile``), the shared Redis cache with its gate and breaker
(``sharedcache``), the control addresses read from both (``controls``), and the jobs
that probe on their own: refresh ahead (``refresh``) and catch-all checks
(``catchall``).

May import ``probing``, ``routing`` and ``base``.
"""
