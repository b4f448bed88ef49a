from .servicer import QueryServicer

__all__ = ["QueryServicer"]
