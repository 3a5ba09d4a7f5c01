"""Shared test settings: hypothesis profile (CI runs the same examples every time)."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "mixres",
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mixres"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
