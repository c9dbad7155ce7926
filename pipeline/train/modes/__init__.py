"""The training modes, one module each; :mod:`pipeline.train.registry` maps names to them.

* :mod:`.ddp` — ``DistributedDataParallel``, every rank holds the whole model;
* :mod:`.fsdp` — FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded;
* :mod:`.average` — model averaging (local SGD), one Spark job per round.

``register_mode`` and the mode base classes are re-exported here for convenience.
"""

from pipeline.train.registry import BarrierMode, Mode, WrapContext, get_mode, register_mode

__all__ = ["BarrierMode", "Mode", "WrapContext", "get_mode", "register_mode"]
