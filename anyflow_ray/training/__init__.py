"""Training: the losses, the teacher / pretrain / distill objectives (Ray-free), seeds, optimizer, checkpoints."""
