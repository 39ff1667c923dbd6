"""Wording of the distributed errors that need no process group: a peer that failed early vs a real timeout."""

from __future__ import annotations

import time

import pytest

from bnkit.distributed import SyncMismatchError, comm, sync_options


class _Work:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def wait(self, timeout: object = None) -> None:
        time.sleep(self.delay)
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")


def test_a_peer_that_failed_at_once_is_not_called_a_timeout() -> None:
    with sync_options(timeout=10.0), pytest.raises(SyncMismatchError) as info:
        comm._run(lambda async_op: _Work(0.0), "layer1.bn")
    message = str(info.value)
    assert "layer1.bn: the collective failed after 0.0 s, before the 10 s timeout" in message
    assert "another rank most likely exited or failed" in message and "within 10 s" not in message


def test_a_real_timeout_says_so() -> None:
    with sync_options(timeout=0.2), pytest.raises(SyncMismatchError, match=r"layer1\.bn: no answer .* within 0\.2 s"):
        comm._run(lambda async_op: _Work(0.2), "layer1.bn")
