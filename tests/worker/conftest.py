"""Worker tests use tiny networks: one intra-op thread is faster for them than a pool whose
threads wait on each other (and it keeps timings steady when the machine is shared)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
