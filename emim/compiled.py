"""Programs compiled once per process, by everything they are a function of.

``train.run`` traces, lowers and compiles its programs (the state's initialisation, the
step, the MI tracker) from the config, the data's shapes and the mesh. A second run of
the same config in one process (a resumed or forked run, a notebook cell run again, a
test that trains twice) gets the same programs back from here instead of tracing them
again, which on a CPU takes longer than the few steps a test trains. The key is the
whole config (every field, those that change no program too: a cache miss costs a
compile, a wrong hit would cost correctness), the data's and the state's shapes,
dtypes and shardings, the mesh's devices and JAX's own settings that change a trace.
XLA's persistent compilation cache, where it is on, still serves a new process.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from typing import Any, Callable, TypeVar

import jax

T = TypeVar("T")

# Least recently used first; a notebook trying many configs keeps the latest few.
_PROGRAMS: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_LIMIT = 32
_LOCK = threading.Lock()


def signature(tree) -> list:
  """The shapes, dtypes and shardings of a pytree of arrays (or shape structs), in order."""
  leaves, treedef = jax.tree.flatten(tree)
  return [str(treedef)] + [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]


def _trace_settings() -> str:
  """JAX's settings that change what a trace produces (x64, default precision, the PRNG
  implementation, threefry partitioning, ...): JAX's own key for its tracing caches."""
  try:
    from jax._src import config as jax_config

    return str(jax_config.trace_context())
  except (ImportError, AttributeError):  # (a JAX without it: the settings emim knows of)
    return str((jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision, jax.config.jax_default_prng_impl,
                jax.config.jax_threefry_partitionable))


def key_of(*parts) -> str:
  """A fingerprint of ``parts`` (JSON-able, or anything with a faithful ``str``) and of
  JAX's settings that change what a trace produces."""
  settings = (jax.__version__, jax.default_backend(), _trace_settings())
  text = json.dumps([settings, *parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def once(what: str, key: str, build: Callable[[], T]) -> T:
  """``build()``'s result for (``what``, ``key``), built on the first call only."""
  name = f"{what}:{key}"
  with _LOCK:
    if name in _PROGRAMS:
      _PROGRAMS.move_to_end(name)
      return _PROGRAMS[name]
  value = build()
  with _LOCK:
    _PROGRAMS[name] = value
    while len(_PROGRAMS) > _LIMIT:
      _PROGRAMS.popitem(last=False)
  return value


def clear() -> None:
  """Forget every program compiled so far in this process."""
  with _LOCK:
    _PROGRAMS.clear()
