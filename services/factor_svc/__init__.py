from .servicer import FactorServicer

__all__ = ["FactorServicer"]
