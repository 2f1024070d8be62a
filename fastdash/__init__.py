"""fastdash: DASH (preemptive sampling + gradient filtering) RL training for reasoning LMs."""

__version__ = "0.1.0"
