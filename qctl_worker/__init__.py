"""The qctl worker node: consumer, pools, rate limits, node state."""
from .worker import Worker

__all__ = ["Worker"]
