"""The Dask client a flow owns: a LocalCluster by default, or the scheduler at ``FEDSCAN_DASK__ADDRESS``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
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
    # Dask already runs one chunk task per core; torch's own intra-op threads on top of that oversubscribe
    # the cores, and on a busy machine every small parallel region then waits for a descheduled thread
    # (measured: SART 8x and FBP 2.5x slower with 2 intra-op threads than with 1, under load). Worker
    # processes get OMP_NUM_THREADS=1 from the nanny; in-process worker threads get it from here.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads(settings))
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
        torch.set_num_threads(threads_before)


def intra_op_threads(settings: DaskSettings) -> int:
    """torch threads for the chunk tasks of an in-process LocalCluster: ``settings.torch_threads``, else the
    cores divided by the Dask threads (1 with the default one-thread-per-core worker)."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    cores = os.cpu_count() or 1
    if settings.n_workers > 1:  # worker processes: the nanny sets OMP_NUM_THREADS=1 there; keep ours
        return torch.get_num_threads()
    return max(1, cores // (settings.threads_per_worker or cores))
