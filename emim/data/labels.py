"""Which classes a dataset keeps (``config.data.class_subset``) and how every split
numbers them: by the training split's class names, so that a class has one label in every
split."""

from __future__ import annotations

import pathlib

import ml_collections

from emim.data import class_lists
from emim.data.dataset import DatasetError


def class_subset(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The classes ``config.data.class_subset`` keeps, sorted (their labels' order): a
  named subset of emim/data/class_lists.py ("imagenet100"), or a file of class names, one
  per line; None keeps every class."""
  name = data_cfg.get("class_subset", "")
  if not name:
    return None
  if name in class_lists.SUBSETS:
    return tuple(sorted(class_lists.SUBSETS[name]))
  path = pathlib.Path(name).expanduser()
  if path.is_file():
    names = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not names:
      raise DatasetError(f"--config.data.class_subset={name!r}: the file names no classes. Write one class name "
                         "(its folder or TFDS label name) per line, or set --config.data.class_subset='' for all.")
    return tuple(sorted(names))
  raise DatasetError(f"--config.data.class_subset={name!r} is neither a known subset ({', '.join(class_lists.SUBSETS)}) "
                     "nor a file of class names, one per line.")


def check_subset_present(found, subset, split: str, where) -> None:
  """The training split must hold every class of the subset (else the labels would not be
  the subset's); other splits may lack some."""
  missing = sorted(set(subset) - set(found))
  if missing and split_is_train(split):
    raise DatasetError(f"Split {split!r} of {where} lacks {len(missing)} class(es) of --config.data.class_subset: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Point config.data.path at a folder with "
                       "all of them (for ImageNet-100: the full ImageNet train/ folder, or one prepared with them).")


def split_is_train(split: str) -> bool:
  return split.startswith("train")



def label_index(split_classes, train_classes: tuple[str, ...], split: str, where) -> dict[str, int]:
  """Each class of ``split`` -> its label: its index among the training split's classes
  (by name), so every split numbers a class alike; a class the training split does not
  have is an error that names it."""
  index = {c: i for i, c in enumerate(train_classes)}
  unknown = sorted(set(split_classes) - set(index))
  if unknown:
    raise DatasetError(f"Split {split!r} of {where} has classes the training split does not: {unknown[:5]}. The "
                       "labels number the training split's classes; remove those folders from the split, or add "
                       "them to the training split.")
  return index
