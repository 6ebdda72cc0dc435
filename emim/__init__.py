"""emim: self-supervised visual representation learning by mutual-information maximisation."""

__version__ = "0.1.0"
