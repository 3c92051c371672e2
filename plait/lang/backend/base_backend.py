"""SGLang's module path for the backend interface."""

from plait.lang.backend.base import BaseBackend

__all__ = ["BaseBackend"]
