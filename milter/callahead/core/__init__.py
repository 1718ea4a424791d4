"""The decision core, with no I/O: the policy that turns a recipient into a
``Decision`` carrying its reply (``policy``) and the dictionary-attack guard per client
(``guard``). Tested with a fake prober.

May import ``caching``, ``probing``, ``routing`` and ``base``.
"""
