"""``callahead doctor``: the backup's Postfix read through postconf (``postfixview``),
each smtpd service's callahead hook checked (``postfixhooks``), each primary and route
probed (``probes``), and the whole run with its report (``checkup``)."""
