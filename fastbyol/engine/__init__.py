"""Composition: device and precision policy, checkpoints, the Trainer loop."""
