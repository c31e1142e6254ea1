"""Meters and sinks: progress bar, JSONL metrics. Takes plain values; imports nothing upstream."""
