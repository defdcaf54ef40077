"""The GCE metadata server, whole: the client and what its answers mean (`client`),
presence and the node identity (`identity`), one watcher per path (`watcher`) and
the source the daemon runs (`source`: detect, watch, identity). The names are
re-exported here: `from probes.metadata import MetadataWatch`."""

from probes.metadata.client import (
    DEFAULT_HOST,
    MAINTENANCE_EVENT,
    MAINTENANCE_VALUES,
    NO_NOTICE_CODES,
    PREEMPTED,
    UPCOMING_MAINTENANCE,
    MetadataClient,
    MetadataValue,
    error_code,
    metadata_base_url,
    parse_maintenance_event,
    parse_preempted,
    parse_upcoming_maintenance,
)
from probes.metadata.identity import MetadataPresence, NodeIdentity, detect_metadata, fetch_identity, serves
from probes.metadata.source import (
    BLIND_NOTE,
    IDENTITY_KEY,
    MAINTENANCE_EVENT_KEY,
    PREEMPTED_KEY,
    UPCOMING_MAINTENANCE_KEY,
    UPCOMING_QUERY,
    WATCH_KEY,
    MetadataListener,
    MetadataWatch,
    WatchSettings,
    WatchTuning,
)
from probes.metadata.watcher import MetadataWatcher

__all__ = [
    "BLIND_NOTE",
    "DEFAULT_HOST",
    "IDENTITY_KEY",
    "MAINTENANCE_EVENT",
    "MAINTENANCE_EVENT_KEY",
    "MAINTENANCE_VALUES",
    "NO_NOTICE_CODES",
    "PREEMPTED",
    "PREEMPTED_KEY",
    "UPCOMING_MAINTENANCE",
    "UPCOMING_MAINTENANCE_KEY",
    "UPCOMING_QUERY",
    "WATCH_KEY",
    "MetadataClient",
    "MetadataListener",
    "MetadataPresence",
    "MetadataValue",
    "MetadataWatch",
    "MetadataWatcher",
    "NodeIdentity",
    "WatchSettings",
    "WatchTuning",
    "detect_metadata",
    "error_code",
    "fetch_identity",
    "metadata_base_url",
    "parse_maintenance_event",
    "parse_preempted",
    "parse_upcoming_maintenance",
    "serves",
]
