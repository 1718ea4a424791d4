"""The backscatter meter: Postfix's mail log read as it is written (``follow`` for a
file, ``journal`` for the systemd journal), its lines parsed (``lines``), and each
recipient callahead accepted joined with its fate (``ledger``), counted in ``meter``."""
