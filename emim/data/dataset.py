"""What every image source returns, and the error a bad dataset raises."""

from __future__ import annotations

import dataclasses

import numpy as np

from emim.errors import UserError


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """uint8 images (N, H, W, 3), int32 labels (N,), and the class names."""

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  input_key = "images"  # the key of the inputs in a batch (VectorDataset: "vectors")

  @property
  def inputs(self) -> np.ndarray:
    return self.images

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)


class DatasetError(UserError, ValueError):
  """A dataset that is missing, empty or corrupt; the message names the fix."""

