"""Export to Cloud Monitoring (SPEC §7): series and descriptors (series), the
monitored resource (resource), the push loop (client), the termination report
(report). Nothing here imports google.cloud.monitoring_v3 until the exporter
builds its first proto or client, so CLI commands that never export don't pay it."""
