"""Checks of what deploy/ ships: the alerting rules and their promtool unit tests, the
Grafana dashboard's queries, the metric names both use, and the systemd unit."""
