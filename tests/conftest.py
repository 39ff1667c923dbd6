"""Test-wide settings: Keras runs on the torch backend, one intra-op thread, a CI-sized hypothesis profile."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "bnkit",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("bnkit")
