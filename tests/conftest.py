"""Shared test setup."""

import os

import pytest
import torch

# Under pytest-xdist each worker gets one core: two workers x two threads would
# oversubscribe the 2-core CI machine and slow everything down.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
