"""Where a recipient's domain is probed: the route table and next-hop syntax
(``routes``), the routes read from Postfix's own maps (``postfixmaps``, ``router``)
and MX resolution with this host's identity (``resolve``).

May import ``base`` only.
"""
