"""What the metadata server says about the node: whether there is one (GCE, GKE
Workload Identity, none) and the node's identity used for resource labels."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from agent.core.backoff import backoff_s
from probes.base import FailureCode, ProbeError
from probes.metadata.client import PREEMPTED, MetadataClient, parse_preempted

log = logging.getLogger(__name__)


class MetadataPresence(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"  # nothing answers: not on GCE
    RESTRICTED = "restricted"  # answers but hides instance/preempted: GKE Workload Identity


async def detect_metadata(client: MetadataClient) -> MetadataPresence:
    """Raises ProbeError when a server answers but badly (503, garbage, hang): unknown."""
    try:
        await client.get("project/project-id")
    except ProbeError as exc:
        if exc.code == FailureCode.ABSENT:
            return MetadataPresence.ABSENT
        raise
    try:
        parse_preempted((await client.get(PREEMPTED)).text)
    except ProbeError as exc:
        if exc.code == FailureCode.NOT_FOUND:
            return MetadataPresence.RESTRICTED
        raise
    return MetadataPresence.PRESENT


async def serves(client: MetadataClient, path: str, params: Mapping[str, str] | None = None) -> bool:
    """False only when the server says the path does not exist (404); any other
    answer, good or bad, leaves it to the watcher, which reports trouble."""
    try:
        await client.get(path, params)
    except ProbeError as exc:
        return exc.code != FailureCode.NOT_FOUND
    return True


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What snapshot key "metadata.identity" holds; each field None when unavailable.
    `unreadable` names fields that failed for another reason than not existing."""

    presence: MetadataPresence
    project_id: str | None = None
    instance_id: str | None = None  # numeric, as gce_instance wants it
    zone: str | None = None  # short: us-central1-a
    instance_name: str | None = None
    hostname: str | None = None
    cluster_name: str | None = None
    cluster_location: str | None = None
    unreadable: tuple[str, ...] = ()



_IDENTITY_PATHS = {
    "project_id": "project/project-id",
    "instance_id": "instance/id",
    "zone": "instance/zone",
    "instance_name": "instance/name",
    "hostname": "instance/hostname",
    "cluster_name": "instance/attributes/cluster-name",
    "cluster_location": "instance/attributes/cluster-location",
}


async def fetch_identity(
    client: MetadataClient,
    presence: MetadataPresence = MetadataPresence.PRESENT,
    *,
    attempts: int = 3,
    retry_base_s: float = 0.5,
) -> NodeIdentity:
    """Reads every identity field at once; transient failures are retried a few times
    because a series' resource never changes once written."""
    if presence is MetadataPresence.ABSENT:
        return NodeIdentity(presence)
    fields = list(_IDENTITY_PATHS)
    answers = await asyncio.gather(*(_optional(client, _IDENTITY_PATHS[f], attempts, retry_base_s) for f in fields))
    values: dict[str, str | None] = {}
    unreadable: list[str] = []
    for field, (value, failed) in zip(fields, answers, strict=True):
        values[field] = value or None
        if failed:
            unreadable.append(field)
    if values["instance_id"] is not None and not values["instance_id"].isdigit():
        values["instance_id"] = None
        unreadable.append("instance_id")
    if values["zone"] is not None:
        values["zone"] = values["zone"].rsplit("/", 1)[-1]  # projects/N/zones/Z -> Z
    return NodeIdentity(presence, **values, unreadable=tuple(unreadable))


async def _optional(client: MetadataClient, path: str, attempts: int, retry_base_s: float) -> tuple[str | None, bool]:
    """(value, failed): a 404 is simply no value; other errors are retried, then reported."""
    for attempt in range(1, attempts + 1):
        try:
            return (await client.get(path)).text, False
        except ProbeError as exc:
            if exc.code == FailureCode.NOT_FOUND:
                return None, False
            if attempt == attempts:
                log.warning("identity field unreadable", extra={"path": path, "error": str(exc)})
                return None, True
            await asyncio.sleep(backoff_s(attempt, retry_base_s, 4 * retry_base_s))
    return None, True

