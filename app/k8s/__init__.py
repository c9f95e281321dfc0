"""Kubernetes: RayService manifests from serve configs, offline validation, apply/status/delete
with the official `kubernetes` client, and import of production-stack Helm values."""
