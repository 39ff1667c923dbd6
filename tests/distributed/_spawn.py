"""Run check functions in a group of spawned gloo CPU processes and report, per check and rank, "ok" or a traceback.

One spawned group runs many checks (spawning costs seconds; a check costs milliseconds). Every process is
bounded by a deadline and killed if it overruns, so a hang fails the test instead of the whole run.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Check = Callable[[int, int], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, module: str, names: list[str], outdir: str) -> None:
    import importlib

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    checks = importlib.import_module(module).CHECKS
    results: dict[str, str] = {}
    out = Path(outdir) / f"rank{rank}.json"
    for name in names:
        try:
            checks[name](rank, world)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        # Written after every check so a later hang still reports the earlier results.
        out.write_text(json.dumps(results))
    # No destroy_process_group: a deliberately abandoned collective (the timeout check) would block it.
    os._exit(0)


def run_checks(world: int, module: str, names: list[str], deadline_s: float = 120.0) -> dict[str, list[str]]:
    """Run ``names`` from ``module.CHECKS`` on ``world`` ranks; returns ``{name: [result of rank 0, ...]}``."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _worker,
            args=(world, free_port(), module, names, outdir),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=max(0.1, end - time.monotonic())):
                if time.monotonic() > end:
                    break
        except Exception:
            pass  # a crashed rank: its missing results are reported below
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results: dict[str, list[str]] = {name: [] for name in names}
        for rank in range(world):
            path = Path(outdir) / f"rank{rank}.json"
            got = json.loads(path.read_text()) if path.exists() else {}
            for name in names:
                results[name].append(got.get(name, f"rank {rank} never reported (crashed or hung)"))
        return results
