"""Evaluation of a frozen encoder: features, kNN, linear probe, export to torchvision."""
