"""The registry of methods. Importing this package registers every method file."""

from emim.methods import emmi, joint, self_distillation  # noqa: F401  (registration)
from emim.methods.base import Method, Views, available, make_method, method_config, register

__all__ = ["Method", "Views", "available", "make_method", "method_config", "register"]
