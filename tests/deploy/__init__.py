"""Tests of deploy/: manifests, systemd units, provisioning, monitoring, the preStop drain."""
