"""normkit: scale control for deep-network training in PyTorch."""

__version__ = "0.1.0"
