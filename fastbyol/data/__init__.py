"""Data: BYOL view augmentations, image sources, and the loaders that feed the step."""
