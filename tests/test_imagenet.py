"""ImageNet end to end on the CPU: ImageNet-100 as a class subset (of an image folder and
of TFDS imagenet2012), ImageNet-1k's config streamed from TFDS, the host decode at a
reduced JPEG scale, and the probe's protocol on streamed crops."""

import json

import jax
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

import emim
from emim import evaluate, export, train
from emim.backbone import restore_backbone
from emim.data import class_lists, sources, streaming

EXTRA = ("n00000001", "n00000002", "n00000003")  # classes outside ImageNet-100


def write_jpeg(path, rng, size):
  """A smooth JPEG of the given (width, height): ImageNet-like content, not noise."""
  w, h = size
  coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
  Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(path, quality=90)


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
  """train/ and val/ of ImageNet's shape: the 100 classes of ImageNet-100 and 3 more,
  JPEGs of varied sizes (2 per class to train on, 1 to test)."""
  root = tmp_path_factory.mktemp("imagenet")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 2), ("val", 1)):
    for wnid in class_lists.IMAGENET100 + EXTRA:
      (root / split / wnid).mkdir(parents=True)
      for i in range(per_class):
        write_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", rng, (int(rng.integers(48, 80)), int(rng.integers(40, 64))))
  return root


@pytest.mark.slow
def test_imagenet100_runlocal_from_an_image_folder_trains_resumes_evaluates_and_exports(imagenet_folder, tmp_path):
  config = load_config("imagenet100", "runlocal")
  with config.unlocked():
    config.data.source, config.data.path, config.data.test_split = "image_folder", str(imagenet_folder), "val"
    config.data.workers = 0
    config.eval.probe_mode, config.eval.probe_epochs, config.eval.probe_batch_size = "augmented", 1, 64
  assert config.data.stream and config.model.backbone == "resnet_tiny_bottleneck"
  straight = train.run(config, str(tmp_path / "straight"))
  train.run(config, str(tmp_path), stop_at_step=2)
  # The checkpoint holds the data iterator's position beside the state.
  saved = json.loads((tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json").read_text())
  assert saved["next_index"] == 2
  resumed = train.run(config, str(tmp_path))
  assert int(resumed.state.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.params)), jax.tree.leaves(jax.device_get(resumed.state.params))):
    np.testing.assert_array_equal(a, b)  # the resumed stream saw the same batches
  # The 100 classes, in sorted order; the 3 others left out.
  assert json.loads((tmp_path / "classes.json").read_text())["train"] == sorted(class_lists.IMAGENET100)
  results = evaluate.evaluate(config, str(tmp_path))
  assert (results["num_train"], results["num_test"]) == (200, 100)
  assert results["linear_mode"] == "augmented" and {"knn_top1_k20", "linear_top1", "linear_top5"} <= set(results)
  step, backbone = restore_backbone(tmp_path, config)
  out = export.export_backbone(backbone, tmp_path / "export", {"step": step})
  model, features = emim.load_backbone(out)
  images = np.asarray(Image.open(next((imagenet_folder / "val").rglob("*.JPEG"))).convert("RGB").resize((40, 40)))
  assert features(images[None]).shape == (1, model.feature_dim) == (1, 8 * 2 * 4)


@pytest.mark.slow
def test_imagenet1k_runlocal_streams_tfds_imagenet2012_evaluates_and_exports(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = load_config("imagenet1k", "runlocal")
  with config.unlocked():
    config.data.workers, config.train.num_steps = 0, 2
    config.eval.probe_mode, config.eval.probe_epochs = "features", 1
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    train.run(config, str(tmp_path))  # (resuming a streamed run: the ImageNet-100 test)
    results = evaluate.evaluate(config, str(tmp_path))
  names = json.loads((tmp_path / "classes.json").read_text())["train"]
  assert len(names) == 1000 and names[0] == "n01440764"  # imagenet2012's own class names
  assert results["num_train"] == 64 and {"knn_top1_k20", "linear_top1"} <= set(results)
  step, backbone = restore_backbone(tmp_path, config)
  model, _ = emim.load_backbone(export.export_backbone(backbone, tmp_path / "export", {"step": step}))
  assert model.model_config["backbone"] == "resnet_tiny_bottleneck"


def test_imagenet100_from_tfds_indexes_its_records_once(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("HOME", str(tmp_path))  # the record index's cache
  subset = tuple(sorted(class_lists.IMAGENET100))
  with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE):
    full = tfds.data_source("imagenet2012", split="train")
    names = tfds.builder("imagenet2012").info.features["label"].names
    expected = [subset.index(names[full[i]["label"]]) for i in range(len(full)) if names[full[i]["label"]] in subset]
    records, classes = sources.tfds_stream_records("imagenet2012", "train", "", subset)
    assert classes == subset and [records[i]["label"] for i in range(len(records))] == expected
    assert list((tmp_path / ".cache" / "emim" / "tfds_subsets").glob("*.npy"))
    monkeypatch.setattr(np, "flatnonzero", lambda *a: pytest.fail("indexed the records again"))
    again, _ = sources.tfds_stream_records("imagenet2012", "train", "", subset)
    assert len(again) == len(records)


def test_a_class_subset_needs_all_its_classes_to_train_and_a_known_name(imagenet_folder, tmp_path):
  import shutil

  partial = tmp_path / "partial"
  shutil.copytree(imagenet_folder / "train", partial / "train")
  shutil.rmtree(partial / "train" / class_lists.IMAGENET100[0])
  with pytest.raises(sources.DatasetError, match=rf"lacks 1 class\(es\) of --config.data.class_subset: "
                                                 rf"\['{class_lists.IMAGENET100[0]}'\]"):
    streaming.image_folder_records(str(partial), "train", subset=tuple(sorted(class_lists.IMAGENET100)))
  config = load_config("imagenet100", "runlocal")
  with config.unlocked():
    config.data.class_subset = "imagenet10"
  with pytest.raises(sources.DatasetError, match="neither a known subset \\(imagenet100\\) nor a file"):
    sources.class_subset(config.data)
  listed = tmp_path / "classes.txt"
  listed.write_text("# two classes\nn02869837\nn01749939\n")
  with config.unlocked():
    config.data.class_subset = str(listed)
  assert sources.class_subset(config.data) == ("n01749939", "n02869837")


def test_a_jpeg_decoded_at_a_reduced_scale_gives_the_same_crops(tmp_path, monkeypatch):
  """The boxes are drawn on the full image either way (the crops' distribution is
  unchanged); the reduced decode is a smaller image, and the crops taken from it are
  close to those from the full decode."""
  path = tmp_path / "big.jpg"
  write_jpeg(path, np.random.default_rng(1), (500, 375))
  decoded_sizes = []
  real_decode = streaming._decode

  def recording(im, keep, name, reduce=True):
    rgb, sx, sy = real_decode(im, keep, name, reduce)
    decoded_sizes.append(rgb.size)
    return rgb, sx, sy

  monkeypatch.setattr(streaming, "_decode", recording)
  boxes = {}
  for reduce in (False, True):
    crops = streaming.TwoCropDecode(streaming._open_file, 32, ((0.08, 1.0), (0.08, 1.0)), reduce=reduce)
    boxes[reduce] = [crops.random_map((str(path), 0), np.random.default_rng(seed))["views"] for seed in range(20)]
  full, reduced = decoded_sizes[:20], decoded_sizes[20:]
  assert set(full) == {(500, 375)} and max(w for w, _ in reduced) <= 250  # at least a 2x reduction, every time
  diff = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(boxes[False], boxes[True])]
  assert max(diff) < 6.0, diff  # the same boxes: nearly the same pixels
  centre = streaming.CentreDecode(streaming._open_file, 40)
  np.testing.assert_allclose(centre.map((str(path), 0))["images"].astype(float),
                             streaming.CentreDecode(streaming._open_file, 40, reduce=False).map((str(path), 0))["images"],
                             atol=40)
  assert decoded_sizes[-2][0] < 500 and decoded_sizes[-1] == (500, 375)
