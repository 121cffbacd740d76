"""The Dask client a flow owns: a LocalCluster by default, or the scheduler at ``FEDSCAN_DASK__ADDRESS``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from schemas.settings import DaskSettings
from tasks.errors import TransientError

logger = logging.getLogger("fedscan.cluster")


@contextmanager
def dask_client(settings: DaskSettings, *, timeout_s: float = 30.0) -> Iterator[Client]:
    """Connect to the configured scheduler, or start a LocalCluster for the duration of the block.

    The client becomes the default scheduler of every dask computation in this process (all threads), so the
    stage drivers, which never start a cluster themselves, run on it.
    """
    if settings.address:
        try:
            client = Client(settings.address, timeout=timeout_s)
        except OSError as exc:  # unreachable scheduler: worth a retry of the flow
            raise TransientError(f"cannot reach the Dask scheduler at {settings.address}: {exc}") from exc
        logger.info("using Dask scheduler %s", settings.address)
        try:
            yield client
        finally:
            client.close()
        return
    # On one machine, threads in one worker process beat several processes (no pickling, shared memory).
    cluster = LocalCluster(
        n_workers=settings.n_workers,
        threads_per_worker=settings.threads_per_worker,
        processes=settings.n_workers > 1,
        memory_limit=settings.memory_limit,
        dashboard_address=None,
    )
    client = Client(cluster)
    logger.info("started a Dask LocalCluster (%d workers)", settings.n_workers)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
