"""The flow's Dask client: torch intra-op threads while an in-process LocalCluster runs."""

from __future__ import annotations

import os

import torch

from schemas.settings import DaskSettings
from tasks.cluster import dask_client, intra_op_threads


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
