"""GradientService: registered datasets (datasets.py, stages.py) and training-gradient blocks
(blocks.py), served by servicer.py."""
