from .servicer import GradientServicer

__all__ = ["GradientServicer"]
