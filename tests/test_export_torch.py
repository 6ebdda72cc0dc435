"""The torchvision-layout export gives the same features in PyTorch as in JAX."""

import jax
import numpy as np
import pytest
from conftest import load_config

from emim import export
from emim.backbone import backbone_from_model_config, init_backbone, model_config_of


def random_backbone(config):
  return init_backbone(model_config_of(config))


torch = pytest.importorskip("torch", reason="PyTorch (CPU) is needed to check the torchvision export")


class TorchBasicBlock(torch.nn.Module):
  """torchvision.models.resnet.BasicBlock, written out (torchvision itself is not needed)."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchBottleneck(torch.nn.Module):
  """torchvision.models.resnet.Bottleneck (v1.5: the stride on the 3x3), written out."""

  expansion = 4

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchResNet(torch.nn.Module):
  """torchvision.models.ResNet's layout (conv1, bn1, maxpool, layer1..N) without fc."""

  def __init__(self, blocks, width, cifar_stem, block=TorchBasicBlock):
    super().__init__()
    nn = torch.nn
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False) if cifar_stem else nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, n in enumerate(blocks):
      planes = width * 2**i
      layers = []
      for j in range(n):
        layers.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
        inplanes = planes * getattr(block, "expansion", 1)
      setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
    self.num_layers = len(blocks)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_layers):
      x = getattr(self, f"layer{i + 1}")(x)
    return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)


@pytest.mark.parametrize("cifar_stem,backbone_name", [(True, "resnet_tiny"), (False, "resnet_tiny"),
                                                     (False, "resnet_tiny_bottleneck")])
def test_torchvision_export_gives_the_same_features(tmp_path, cifar_stem, backbone_name):
  from safetensors.torch import load_file

  config = load_config("synthetic", "runlocal")
  with config.unlocked():
    config.model.cifar_stem = cifar_stem
    config.model.backbone = backbone_name
    config.data.image_size = 32
  backbone = random_backbone(config)
  # Non-trivial BatchNorm statistics and scales, so a wrong mapping cannot pass.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32), backbone.variables)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
  backbone = backbone_from_model_config(model_config_of(config), variables)
  out = export.export_backbone(backbone, tmp_path)
  block = TorchBottleneck if backbone_name.endswith("bottleneck") else TorchBasicBlock
  model = TorchResNet([1, 1], config.model.width, cifar_stem, block)
  model.load_state_dict(load_file(str(out / export.TORCH_FILE)), strict=True)
  model.eval()
  images = rng.uniform(size=(4, 32, 32, 3)).astype(np.float32)
  jax_features = np.asarray(backbone.features_fn()(images))
  normalised = (images - np.array(config.data.mean, np.float32)) / np.array(config.data.std, np.float32)
  with torch.no_grad():
    torch_features = model(torch.from_numpy(normalised).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(torch_features, jax_features, rtol=1e-4, atol=1e-4)
