"""The Dask client a flow owns: a LocalCluster by default, or the scheduler at ``FEDSCAN_DASK__ADDRESS``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import dask
import torch
from distributed import Client, LocalCluster

from schemas.settings import WORKER_ALLOCATOR_ENVIRON, DaskSettings
from tasks.errors import TransientError

logger = logging.getLogger("fedscan.cluster")


def connect_scheduler(
    settings: DaskSettings, *, timeout_s: float = 30.0, sleep: Callable[[float], None] = time.sleep
) -> Client:
    """A client of the scheduler at ``settings.address``, tried ``connect_attempts`` times with a doubling wait
    (an unreachable scheduler at 02:00 should not lose the night); each failed try is logged at WARNING."""
    address = settings.address
    assert address is not None
    wait = settings.connect_backoff_s
    for attempt in range(1, settings.connect_attempts + 1):
        try:
            return Client(address, timeout=timeout_s)
        except OSError as exc:
            if attempt == settings.connect_attempts:
                raise TransientError(
                    f"cannot reach the Dask scheduler at {address} after {attempt} tries: {exc}"
                ) from exc
            logger.warning(
                "Dask scheduler %s unreachable (try %d of %d: %s); trying again in %.0f s",
                address,
                attempt,
                settings.connect_attempts,
                exc,
                wait,
            )
            sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


@contextmanager
def dask_client(settings: DaskSettings, *, timeout_s: float = 30.0) -> Iterator[Client]:
    """Connect to the configured scheduler, or start a LocalCluster for the duration of the block.

    The client becomes the default scheduler of every dask computation in this process (all threads), so the
    stage drivers, which never start a cluster themselves, run on it.
    """
    if settings.address:
        client = connect_scheduler(settings, timeout_s=timeout_s)
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
    processes = settings.n_workers > 1
    with worker_environ(WORKER_ALLOCATOR_ENVIRON if processes and settings.tune_worker_allocator else {}):
        cluster = LocalCluster(
            n_workers=settings.n_workers,
            threads_per_worker=settings.threads_per_worker,
            processes=processes,
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


@contextmanager
def worker_environ(environ: Mapping[str, str]) -> Iterator[None]:
    """Worker processes started by a nanny inside the block get ``environ`` from their first instruction on.

    Variables such as ``MALLOC_TRIM_THRESHOLD_`` are read when a process starts, so they must reach the nanny's
    ``distributed.nanny.pre-spawn-environ``, which a nanny also keeps for the workers it restarts. The nanny
    prefers this process's own value of a variable to the configuration's, and copies the variables into this
    process when it spawns a worker; both are therefore set for the block and restored afterwards.
    """
    if not environ:
        yield
        return
    before = {k: os.environ.get(k) for k in environ}
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **environ}
    os.environ.update(environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
            yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def intra_op_threads(settings: DaskSettings) -> int:
    """torch threads for the chunk tasks of an in-process LocalCluster: ``settings.torch_threads``, else the
    cores divided by the Dask threads (1 with the default one-thread-per-core worker)."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    cores = os.cpu_count() or 1
    if settings.n_workers > 1:  # worker processes: the nanny sets OMP_NUM_THREADS=1 there; keep ours
        return torch.get_num_threads()
    return max(1, cores // (settings.threads_per_worker or cores))
