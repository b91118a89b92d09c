"""Benchmarks: measurements of pruneflow against plain reference implementations (not used by the package)."""
