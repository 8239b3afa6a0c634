"""Training: megatron-core forward/backward schedules, DDP and optimizer (groundwork)."""
