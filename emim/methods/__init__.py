"""The registry of methods: each method's default config (defaults.py, no JAX: the
configs import it) and its builder (one small file per family, registered on import).

``available`` and ``method_config`` need no JAX; ``Method``, ``Views``, ``make_method``
and ``register`` import the builders on first use."""

from emim.methods.defaults import available, method_config

_BUILDER_API = ("Method", "Views", "make_method", "register", "symmetrized")


def __getattr__(name):
  if name in _BUILDER_API:
    from emim.methods import base, emmi, joint, self_distillation  # noqa: F401  (registration)

    return getattr(base, name)
  raise AttributeError(f"module 'emim.methods' has no attribute {name!r}")


__all__ = ["available", "method_config", *_BUILDER_API]
