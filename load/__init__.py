"""Load generator and benchmarks for livesale: `python -m load spike` and `python -m load bench`."""
