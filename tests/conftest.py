"""Shared test set-up: one torch thread per xdist worker, so workers don't oversubscribe the cores."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
