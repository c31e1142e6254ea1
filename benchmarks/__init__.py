"""Benchmarks: a shared harness and one script per subject; results/ holds CSV and markdown per device and date."""
