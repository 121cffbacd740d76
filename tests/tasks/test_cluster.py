"""The flow's Dask client: torch intra-op threads while an in-process LocalCluster runs; worker processes' allocator
environment."""

from __future__ import annotations

import os

import dask
import pytest
import torch

from schemas.settings import WORKER_ALLOCATOR_ENVIRON, DaskSettings
from tasks.cluster import dask_client, intra_op_threads, worker_environ


def test_one_torch_thread_per_chunk_task_when_dask_uses_every_core() -> None:
    settings = DaskSettings(n_workers=1, threads_per_worker=os.cpu_count() or 1)
    assert intra_op_threads(settings) == 1
    assert intra_op_threads(DaskSettings(n_workers=1, threads_per_worker=1)) == (os.cpu_count() or 1)
    assert intra_op_threads(DaskSettings(torch_threads=3)) == 3


def test_the_client_sets_the_threads_for_its_block_and_restores_them() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with dask_client(DaskSettings(n_workers=1, threads_per_worker=2, torch_threads=1)) as client:
            inside = client.submit(torch.get_num_threads, pure=False).result()
            assert torch.get_num_threads() == 1
            assert inside == 1  # a worker thread of the in-process cluster
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _allocator_environ() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in WORKER_ALLOCATOR_ENVIRON}


def test_worker_environ_sets_the_spawn_environment_for_its_block_and_restores_it(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # a value of this process's own, kept afterwards
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    config_before = dask.config.get("distributed.nanny.pre-spawn-environ")
    with worker_environ({"MALLOC_TRIM_THRESHOLD_": "777", "MALLOC_MMAP_THRESHOLD_": "888"}):
        assert _allocator_environ() == {"MALLOC_TRIM_THRESHOLD_": "777", "MALLOC_MMAP_THRESHOLD_": "888"}
        pre_spawn = dask.config.get("distributed.nanny.pre-spawn-environ")
        assert pre_spawn["MALLOC_TRIM_THRESHOLD_"] == "777" and pre_spawn["MALLOC_MMAP_THRESHOLD_"] == "888"
        assert pre_spawn["OMP_NUM_THREADS"] == config_before["OMP_NUM_THREADS"]  # Dask's other entries stay
    assert _allocator_environ() == {"MALLOC_TRIM_THRESHOLD_": "12345", "MALLOC_MMAP_THRESHOLD_": None}
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == config_before


def test_worker_processes_start_with_the_allocator_settings_unless_switched_off() -> None:
    def seen(settings: DaskSettings) -> dict[str, str | None]:
        with dask_client(settings) as client:
            first, second = client.run(_allocator_environ).values()  # two worker processes
        assert first == second
        return first

    assert seen(DaskSettings(n_workers=2, threads_per_worker=1)) == WORKER_ALLOCATOR_ENVIRON
    # Dask's own default, as before fedscan's setting (and nothing left behind by the run above).
    assert seen(DaskSettings(n_workers=2, threads_per_worker=1, tune_worker_allocator=False)) == {
        "MALLOC_TRIM_THRESHOLD_": str(dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]),
        "MALLOC_MMAP_THRESHOLD_": None,
    }


def test_an_unreachable_scheduler_is_tried_again_with_backoff_then_named(caplog):
    import socket

    from schemas.settings import DaskSettings
    from tasks.cluster import connect_scheduler
    from tasks.errors import TransientError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    settings = DaskSettings(address=address, connect_attempts=3, connect_backoff_s=2.0)
    waits: list[float] = []
    with caplog.at_level("WARNING", logger="fedscan.cluster"), pytest.raises(TransientError) as raised:
        connect_scheduler(settings, timeout_s=1.0, sleep=waits.append)
    assert waits == [2.0, 4.0]  # doubling, and no wait after the last try
    assert f"cannot reach the Dask scheduler at {address} after 3 tries" in str(raised.value)
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all(address in r.getMessage() for r in warned)
