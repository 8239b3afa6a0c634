"""Training: ``torchrun -m mmcap.train`` (config, loop), megatron-core step, checkpoints."""
