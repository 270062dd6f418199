"""The open-file limit: raised to the hard limit at start-up, and the connection cap fitted
under it, so that a crowd (or one address) meets a clear refusal rather than a server that can
no longer accept, open a Redis connection or read a file."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("livesale")

SPARE = 64  # listening sockets, pub/sub links, log and data files, the odd subprocess pipe
MAX_TARGET = 1 << 20  # when the hard limit is "unlimited": the kernel's usual nr_open


def raise_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return MAX_TARGET if soft == resource.RLIM_INFINITY else soft


def current_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_TARGET if soft == resource.RLIM_INFINITY else soft


def fit_connections(wanted: int, pools: int, limit: int) -> tuple[int, str | None]:
    """The connections a process may hold beside its `pools` (Redis and SQL connections) under
    `limit` open files, and a one-line warning when that is fewer than `wanted`."""
    room = max(1, limit - pools - SPARE)
    if wanted <= room:
        return wanted, None
    return room, (f"the open-file limit ({limit}) holds {room} connections per process beside {pools} pool "
                  f"connections, not the {wanted} configured (LIVESALE_MAX_CONNECTIONS): serving at most {room}; "
                  "raise the limit (ulimit -n, LimitNOFILE=) to serve more")
