"""Process limits the daemon sets for itself at start: the open-file soft limit is
raised to the hard one (systemd gives services a soft limit of 1024 unless the unit
sets LimitNOFILE), and the HTTP connection cap is kept below whatever remains."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Descriptors kept for everything but inbound HTTP: vLLM and metadata sessions, gRPC,
# NVML device files, the state file, log pipes.
FD_RESERVE = 64


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
    return soft, hard


def connection_cap(configured: int) -> int:
    """The most inbound connections this process can hold without running out of fds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, soft - FD_RESERVE))
