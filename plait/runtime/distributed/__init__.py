"""Tensor parallelism over `torch.distributed`: the process group of one model's ranks, how a
decoder's weights split across them, and the lock-step protocol by which the scheduler on rank 0
drives the model workers on the other ranks (docs/architecture.md, "Scale-out")."""
