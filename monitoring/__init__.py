"""Prometheus around the ensemble plugin: its config, alert rules, control script, report and Grafana dashboard."""
