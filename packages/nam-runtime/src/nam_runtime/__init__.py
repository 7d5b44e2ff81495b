"""megatron-core on CPU, process-group set-up and the multi-process test harness."""

__version__ = "0.1.0"
