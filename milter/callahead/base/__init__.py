"""The ground every layer stands on: the one error family (``errors``), log-field
escaping and secret redaction (``logfmt``), and recipient-address syntax
(``address``: normalization, Postfix's quoting, the bytes that may go on the wire).

May import nothing of callahead outside this folder. Everything else may import it.
"""
