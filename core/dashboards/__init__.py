"""Grafana dashboards and Prometheus rules for kvpilot, generated from code.

`python -P -m kvpilot.dashboards` writes deploy/dashboards/*.json, deploy/prometheus/rules.yaml and
the chart's copies of both (helm/kvpilot/files/); `--check` fails when any checked-in file is
stale. The dashboards need the `dashboards` extra (grafana-foundation-sdk); the rules
(`kvpilot.dashboards.rules`) and the query checks (`kvpilot.dashboards.queries`) do not.
"""
