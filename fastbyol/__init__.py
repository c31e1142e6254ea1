"""fastbyol: high-throughput, exact BYOL pretraining of ResNets on PyTorch."""

__version__ = "0.1.0"
