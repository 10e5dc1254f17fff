"""Training: distributed communication, precision, optimisation, checkpoints and the pretrain loop."""
