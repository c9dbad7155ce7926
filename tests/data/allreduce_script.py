"""An unmodified torchrun-style script: env:// rendezvous, one all_reduce, print, exit.

Run it with ``torchrun --nproc-per-node 2 allreduce_script.py`` or through
``pipeline.launch.launcher.run_distributed``; ``--exit-code N`` makes it exit with N after the
collective (the launcher must report the failure with this script's output).
"""

import argparse
import sys

import torch
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(f"rank {rank}/{world} all_reduce sum={value.item():g}", flush=True)
    dist.destroy_process_group()
    if args.exit_code and rank == world - 1:
        print(f"rank {rank} exiting with code {args.exit_code}", file=sys.stderr, flush=True)
    return args.exit_code if rank == world - 1 else 0


if __name__ == "__main__":
    sys.exit(main())
