"""Jobs over Redis: task streams with leases (queue.py), operation records (operations.py)."""
