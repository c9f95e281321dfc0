"""Observability artefacts built from the ingress's metrics: the Grafana dashboard."""
