"""The service system: job stages over object storage and Redis queues, composed from the engine."""
