"""influence: EK-FAC influence functions for causal LMs as a gRPC service system (docs/architecture.md)."""

from importlib import metadata


def version() -> str:
    """The installed package's version ("unknown" when run from a tree that is not installed)."""
    try:
        return metadata.version("influence-services")
    except metadata.PackageNotFoundError:
        return "unknown"
