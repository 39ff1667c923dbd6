"""DDP training on CPU with bnkit's synchronised BatchNorm.

Run on 2 processes (gloo, CPU):

    torchrun --standalone --nproc_per_node 2 examples/ddp_syncbn.py

Each rank sees a different shard of the data, but every BatchNorm normalises with the statistics of the
union of all ranks' batches (exact count/mean/M2 merge, one all_gather forward and one all_reduce backward
per layer), so the running statistics stay identical on every rank. Without torchrun it runs as a single
process, where the same layers behave exactly like plain BatchNorm.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bnkit


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def make_data(n: int = 512) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 1, 12, 12, generator=g) + labels.view(-1, 1, 1, 1).float()
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = parser.parse_args()

    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank() if distributed else 0

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    model = bnkit.convert(make_model(), "sync")  # every BatchNorm -> bnkit.BatchNorm(sync=True)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    data = make_data()
    sampler = DistributedSampler(data, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total, seen = 0.0, 0
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            seen += len(labels)
        if rank == 0:
            print(f"epoch {epoch}: train loss {total / seen:.4f}", flush=True)

    # Synchronised layers keep identical running statistics on every rank; check it.
    net = model.module if distributed else model
    stats = torch.cat([t.flatten() for name, t in net.named_buffers() if "running" in name])
    if distributed:
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, stats)
        same = all(torch.equal(g, stats) for g in gathered)
        if rank == 0:
            print(f"running statistics identical on all {len(gathered)} ranks: {same}", flush=True)
        # Let every rank finish and free DDP (reference cycles keep it alive until collected) before tearing
        # the group down: a gloo group destroyed under a live DDP reducer can abort the process at exit.
        dist.barrier()
        del model, net, optimizer
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
