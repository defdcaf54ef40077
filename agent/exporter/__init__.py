"""Export to Cloud Monitoring (SPEC §7): series and descriptors (`series`), the
monitored resource (`resource`), the push loop (`push_loop`: Exporter), the
google-cloud-monitoring client and its errors (`api_client`), the backlog
(`backlog`), export health (`health`) and the termination report (`report`).
It reads the node only through the node view (agent/node_view.py). Nothing here
imports google.cloud.monitoring_v3 until the exporter builds its first proto or
client, so CLI commands that never export don't pay it."""
