"""livesale: a live-stream shopping server."""
