"""Measurement: throughput and latency (accuracy evaluation lives here too as it lands)."""

from .throughput import TimingResult, compare_throughput, time_forward

__all__ = ["TimingResult", "compare_throughput", "time_forward"]
