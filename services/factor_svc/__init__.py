"""FactorService: fits curvature factors as jobs (stages.py) and serves the factor sets (servicer.py)."""
