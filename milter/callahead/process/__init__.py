"""The process: the configuration read once from one table of variables (``config``),
the one place where the parts are assembled (``assembly``), the serving process and
its signals (``server``), the watchdog (``watchdog``), and the command line (``cli``).

May import every layer; nothing imports it but ``callahead.__main__``.
"""
