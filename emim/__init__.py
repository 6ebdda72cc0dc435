"""emim: self-supervised visual representation learning by mutual-information maximisation."""

__version__ = "0.1.0"


def load_backbone(path, dtype=None):
  """(Backbone, jitted features(images)) from a directory written by ``emim.export``;
  ``dtype="float32"`` computes a bfloat16-trained backbone in float32."""
  from emim.export import load_backbone as _load  # deferred: keeps `import emim` light

  return _load(path, dtype)
