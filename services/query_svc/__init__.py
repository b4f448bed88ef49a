"""QueryService: scoring and self-influence jobs (stages.py), their reports (reports.py) and results (servicer.py)."""
