"""Baseline for bench/epoch.py: the same MLP and data, trained by a plain torchrun DDP script.

Run as ``torchrun --nproc_per_node=2 bench/_plain_ddp.py --shards DIR --batch-size 512``.
Each rank loads its contiguous slice of the train split (the rows our reader would give it
with ``shuffle=False``) into memory *before* the clock starts, then trains one epoch over a
random permutation of it. Rank 0 prints ``{"seconds": …, "steps": …}`` for the epoch only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.data.shardset import ShardSet
from pipeline.train.models import mlp


def load_slice(uri: str, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    shards = ShardSet.open(uri)
    split = shards.split("train")
    per_rank = split.rows // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    feats, labels, pos = [], [], 0
    for shard in split.shards:
        a, b = max(lo, pos), min(hi, pos + shard.rows)
        if a < b:
            t = pq.read_table(shards.shard_path(shard)).slice(a - pos, b - a)
            col = t.column("features").combine_chunks()
            feats.append(col.flatten().to_numpy().reshape(len(t), shards.feature_dim))
            labels.append(t.column("label").to_numpy())
        pos += shard.rows
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(feats), dtype=np.float32))
    return x, torch.from_numpy(np.concatenate(labels).astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--classes", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = load_slice(args.shards, rank, world)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        mlp(input_shape=(x.shape[1],), num_outputs=args.classes, hidden=args.hidden)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dist.barrier()
    start = time.perf_counter()
    order = torch.randperm(len(x))
    steps = 0
    for i in range(0, len(x), args.batch_size):
        idx = order[i : i + args.batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"seconds": seconds, "steps": steps, "threads": torch.get_num_threads(),
                          "omp": os.environ.get("OMP_NUM_THREADS")}))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown, as pipeline.worker does: with torch 2.13, gloo + DDP processes
    # abort at exit now and then ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)
