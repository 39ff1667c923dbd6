"""Test-wide settings: Keras runs on the torch backend, one intra-op thread, a CI-sized hypothesis profile."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch

# With KERAS_BACKEND=torch, torch.utils.tensorboard imports TensorFlow, which imports Keras, which loads triton:
# a segfault unless torch._dynamo was imported first (bnkit.Monitor does it too; a test's own SummaryWriter
# may come first).
import torch._dynamo
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
