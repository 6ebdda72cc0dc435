"""The machines emim's programs are compiled for ahead of time, and their published specs.

A target is written as on the command line: a Cloud TPU slice as its generation and chips
per dimension (``v5e:2x4`` = v5litepod-8, ``v4:2x2x1`` = v4-8, ``v5p:2x2x1`` = v5p-8,
``v6e:2x4`` = v6e-8, ``v5e:8x8`` = v5litepod-64 on 16 hosts), or NVIDIA GPUs as their
model and count, ``h100:8`` (one host of 8) or ``h100:2x8`` (two hosts of 8 each).
``parse_target`` reads it without touching a compiler; ``target_devices`` asks JAX for
the compile-only devices: libtpu's for a TPU (the tpu extra), jax's CUDA plugin's for a
GPU (the cuda-aot extra), which needs no GPU, only the GPU's description
(``gpu_target_config``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import emim.aot
from emim.errors import UserError


class TargetError(UserError):
  """A --target that names no machine emim knows, or whose compiler is not installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float  # device memory, GiB
  bf16_tflops: float  # peak dense bf16 FLOP/s per device, 1e12 (no sparsity)
  hbm_gbps: float  # memory bandwidth per device, 1e9 bytes/s
  slice_name: str  # a set of n: "{chips}", "{cores}" (TPU: 2 per v4/v5p chip), "{hosts}", "{per_host}"
  platform: str = "tpu"  # JAX's platform: "tpu" or "cuda"


# TPUs, per chip, as Google publishes them (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e, the "system architecture" tables, read 2026-11-30). v4 and v5p slices are named by
# TensorCores (2 per chip), v5e and v6e by chips.
TPUS = {
    "v4": Chip(hbm_gib=32, bf16_tflops=275, hbm_gbps=1228, slice_name="v4-{cores}"),
    "v5e": Chip(hbm_gib=16, bf16_tflops=197, hbm_gbps=819, slice_name="v5litepod-{chips}"),
    "v5p": Chip(hbm_gib=95, bf16_tflops=459, hbm_gbps=2765, slice_name="v5p-{cores}"),
    "v6e": Chip(hbm_gib=32, bf16_tflops=918, hbm_gbps=1640, slice_name="v6e-{chips}"),
}

# NVIDIA GPUs (SXM boards, the ones 8-GPU cloud hosts carry). Peak dense bf16 tensor-core
# FLOP/s and memory bandwidth from NVIDIA's datasheets: the A100's ("NVIDIA A100 Tensor
# Core GPU" datasheet: BF16 312 TFLOPS, 1,555 GB/s for 40 GB, 2,039 GB/s for 80 GB), the
# H100's ("H100 Tensor Core GPU" datasheet, SXM: BF16 1,979 TFLOPS *with sparsity*, so
# 989.5 dense; 3.35 TB/s) and the H200's (H200 datasheet, SXM: same 1,979 with sparsity;
# 4.8 TB/s). Memory as CUDA reports it (device_memory_size in XLA's own target specs,
# github.com/openxla/xla, xla/backends/gpu/target_config/specs/{a100_sxm_40,a100_sxm_80,
# h100_sxm,h200}.txtpb): a GPU's "80 GB" is 79.1 GiB.
GPUS = {
    "a100-40g": Chip(hbm_gib=42331013120 / 2**30, bf16_tflops=312, hbm_gbps=1555, platform="cuda",
                     slice_name="{hosts}x {per_host} A100 40GB"),
    "a100-80g": Chip(hbm_gib=85100068864 / 2**30, bf16_tflops=312, hbm_gbps=2039, platform="cuda",
                     slice_name="{hosts}x {per_host} A100 80GB"),
    "h100": Chip(hbm_gib=84942979072 / 2**30, bf16_tflops=989.5, hbm_gbps=3352, platform="cuda",
                 slice_name="{hosts}x {per_host} H100 80GB"),
    "h200": Chip(hbm_gib=151397597184 / 2**30, bf16_tflops=989.5, hbm_gbps=4800, platform="cuda",
                 slice_name="{hosts}x {per_host} H200 141GB"),
}

# What XLA's GPU compiler reads of a GPU (a GpuTargetConfigProto's gpu_device_info), from
# XLA's specs named above (sm_80: 108 SMs; sm_90: 132 SMs), the fields this jaxlib's proto
# knows. The compiler sizes its kernels (tiles, shared memory, occupancy) from these.
_SM80 = dict(major=8, shared_memory_per_core=167936, shared_memory_per_block_optin=166912, core_count=108,
             fpus_per_core=64, l2_cache_size=41943040, clock_rate_ghz=1.41)
_SM90 = dict(major=9, shared_memory_per_core=233472, shared_memory_per_block_optin=232448, core_count=132,
             fpus_per_core=128, l2_cache_size=52428800, clock_rate_ghz=1.98)
_GPU_DEVICE_INFO = {"a100-40g": (_SM80, "NVIDIA A100-SXM4-40GB"), "a100-80g": (_SM80, "NVIDIA A100-SXM4-80GB"),
                    "h100": (_SM90, "NVIDIA H100 80GB HBM3"), "h200": (_SM90, "NVIDIA H200 141GB HBM3e")}


def gpu_target_config(model: str) -> str:
  """The GpuTargetConfigProto (text format) that describes one GPU of ``model`` to XLA."""
  arch, name = _GPU_DEVICE_INFO[model]
  chip = GPUS[model]
  return f"""gpu_device_info {{
  cuda_compute_capability {{ major: {arch['major']} minor: 0 }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {arch['shared_memory_per_core']}
  shared_memory_per_block_optin: {arch['shared_memory_per_block_optin']}
  threads_per_core_limit: 2048
  core_count: {arch['core_count']}
  fpus_per_core: {arch['fpus_per_core']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_gbps * 1e9)}
  l2_cache_size: {arch['l2_cache_size']}
  clock_rate_ghz: {arch['clock_rate_ghz']}
  device_memory_size: {round(chip.hbm_gib * 2**30)}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  """A target as written, read: the model (a TPU generation or a GPU) and its shape."""
  text: str
  model: str
  dims: tuple[int, ...]  # TPU: chips per dimension; GPU: (hosts, GPUs per host)

  @property
  def chip(self) -> Chip:
    return TPUS.get(self.model) or GPUS[self.model]

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def devices(self) -> int:
    return math.prod(self.dims)


# The most GPUs of each model one cloud host holds: 16 A100 40GB (Google Cloud's
# a2-megagpu-16g, an NVSwitch domain of 16); 8 of the others (HGX boards: a2-ultragpu-8g,
# a3-highgpu-8g, a3-ultragpu-8g; AWS p4de, p5, p5e).
GPUS_PER_HOST = {"a100-40g": 16, "a100-80g": 8, "h100": 8, "h200": 8}


def parse_target(text: str) -> TargetSpec:
  """``v5e:2x4``, ``h100:8``, ``h100:2x8`` ... read, or a TargetError naming the forms."""
  model, sep, shape = text.strip().lower().partition(":")
  known = ", ".join(list(TPUS) + list(GPUS))
  if not sep or model not in {**TPUS, **GPUS}:
    raise TargetError(f"--target={text!r}: give a TPU generation or a GPU ({known}) and its shape, e.g. v5e:2x4 "
                      "(a v5litepod-8), v4:2x2x1 (a v4-8), h100:8 (one host of 8 H100s), h100:2x8 (two hosts).")
  if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", shape):
    raise TargetError(f"--target={text!r}: give the shape as positive numbers joined by x, e.g. v5e:2x4 or h100:8.")
  dims = tuple(int(d) for d in shape.split("x"))
  if model in GPUS:
    if len(dims) > 2:
      raise TargetError(f"--target={text!r}: a GPU target is GPUs per host (h100:8) or hosts x GPUs per host "
                        "(h100:2x8).")
    dims = (1,) + dims if len(dims) == 1 else dims
    if dims[1] > GPUS_PER_HOST[model]:
      # All the GPUs asked for (hosts x per host), on hosts of 8: not one host's alone.
      raise TargetError(f"--target={text!r}: {dims[1]} GPUs on one host; a cloud host holds at most "
                        f"{GPUS_PER_HOST[model]} of these (give more hosts: {model}:{-(-dims[0] * dims[1] // 8)}x8).")
  elif len(dims) > 3:
    raise TargetError(f"--target={text!r}: a TPU slice has at most 3 dimensions, e.g. v5p:2x2x2.")
  return TargetSpec(text, model, dims)


@dataclasses.dataclass(frozen=True)
class Target:
  """A target's compile-only devices."""
  spec: TargetSpec
  devices: tuple
  hosts: int

  @property
  def chip(self) -> Chip:
    return self.spec.chip

  @property
  def topology(self) -> str:
    return self.spec.text

  @property
  def name(self) -> str:
    n = len(self.devices)
    return self.chip.slice_name.format(chips=n, cores=2 * n, hosts=self.hosts, per_host=n // self.hosts)

  @property
  def compiler(self) -> str:
    """The compiler in use, named with its version, e.g. "libtpu 0.0.42.1"."""
    if self.spec.platform == "tpu":
      from emim.tpu import libtpu_in_use

      return f"libtpu {libtpu_in_use()[0]}"
    from importlib import metadata

    try:
      return f"XLA's GPU compiler (jax-cuda12-plugin {metadata.version('jax-cuda12-plugin')})"
    except metadata.PackageNotFoundError:
      return "XLA's GPU compiler"

  @property
  def unit(self) -> str:
    return "GPU" if self.spec.platform == "cuda" else "chip"


# JAX on a GPU allocates from a pool of 75% of its memory by default (jax's "GPU memory
# allocation" page; later jax versions let the pool grow beyond it, the jaxlib measured here
# does not); XLA_CLIENT_MEM_FRACTION (formerly XLA_PYTHON_CLIENT_MEM_FRACTION) sets the share,
# XLA_PYTHON_CLIENT_ALLOCATOR=platform allocates from the whole memory. A program fits a GPU
# when it fits that pool, read from the environment the check runs in: set it as the run will.
JAX_GPU_POOL = 0.75
_POOL_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
_ALLOCATORS = ("default", "platform", "bfc", "cuda_async", "vmm")  # jaxlib 0.10.2's xla_client: the rest it refuses


def memory_pool(chip) -> tuple[float, str]:
  """(the share of a device's memory a run may use, what sets it: "" on a TPU, all of it)."""
  if getattr(chip, "platform", "tpu") != "cuda":
    return 1.0, ""
  # Read as jaxlib's xla_client reads them, unstripped: a value it refuses as the run starts
  # (" platform", a set but empty allocator, a blank share) is refused here, not taken for another.
  given = [name for name in _POOL_VARIABLES if os.environ.get(name, "")]
  if len(given) == 2:  # jaxlib's GPU client refuses the pair (a ValueError as it starts), whatever the allocator
    raise TargetError(f"{' and '.join(f'{n}={os.environ[n]!r}' for n in given)} are both set, which JAX "
                      f"refuses on a GPU: unset {_POOL_VARIABLES[1]} (the old name).")
  allocator = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR")
  if allocator is not None and allocator.lower() not in _ALLOCATORS:  # jaxlib's GPU client: a ValueError as it starts
    raise TargetError(f"XLA_PYTHON_CLIENT_ALLOCATOR={allocator!r}: JAX takes {', '.join(_ALLOCATORS)}, without "
                      "spaces (platform: no pool, each allocation from CUDA); unset it for the default pool.")
  if allocator is not None and allocator.lower() == "platform":
    return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform"
  for name in _POOL_VARIABLES:
    text = os.environ.get(name, "")
    if text:
      try:
        share = float(text)
      except ValueError:
        share = -1.0
      if not 0 < share <= 1:
        raise TargetError(f"{name}={text!r}: give the share of each GPU's memory JAX may use, above 0 and at most 1, "
                          "e.g. .95.")
      return share, f"{name}={text.strip()}"
  return JAX_GPU_POOL, "JAX's default pool; XLA_CLIENT_MEM_FRACTION=.95 raises it"


def usable_bytes(target) -> int:
  """The memory per device a program may take: a TPU chip's HBM, a GPU's JAX pool."""
  return int(target.chip.hbm_gib * memory_pool(target.chip)[0] * 2**30)


CUDA_PLUGIN_ADVICE = ('jax\'s CUDA plugin compiles for GPUs on any machine, no GPU needed: pip install -e ".[cuda-aot]" '
                      "(jax[cuda12], about 5 GB; best in its own virtual environment)")


def cuda_plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except (ImportError, ValueError):
    return False


def target_devices(text: str) -> Target:
  """The compile-only devices of a target, e.g. "v5e:2x4" or "h100:8"."""
  spec = parse_target(text)
  from jax.experimental import topologies

  if spec.platform == "tpu":
    options = {}
    if spec.model in ("v4", "v5p"):  # a device per chip (its two TensorCores as one), as JAX runs them
      options["chip_config_name"] = "megacore"
    elif spec.devices <= 8:  # v5e-8 and v6e-8 are one VM of 8 chips (larger slices: VMs of 4)
      options["chips_per_host_bounds"] = tuple(list(spec.dims) + [1] * (3 - len(spec.dims)))
    shape = "x".join(map(str, spec.dims))
    try:
      emim.aot.libtpu_environment()
      devices = topologies.get_topology_desc(f"{spec.model}:{shape}", "tpu", **options).devices
    except Exception as e:  # libtpu absent, or a shape the generation does not come in
      import importlib.util

      from emim.aot.report import one_line

      # With libtpu installed the shape is what is wrong: installing it again would not help.
      fix = ('libtpu installs with pip install -e ".[tpu]"' if importlib.util.find_spec("libtpu") is None else
             f"a shape {spec.model} slices come in: docs/tpu.md lists them")
      raise TargetError(f"--target={text}: {one_line(e)} ({fix}).") from None
  else:
    if not cuda_plugin_installed():
      raise TargetError(f"--target={text}: {CUDA_PLUGIN_ADVICE}.")
    hosts, per_host = spec.dims
    try:  # topology: slices x hosts x GPUs per host
      devices = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                             target_config=gpu_target_config(spec.model)).devices
    except Exception as e:
      from emim.aot.report import one_line

      raise TargetError(f"--target={text}: jax's CUDA plugin could not describe it: {one_line(e)}") from None
  return Target(spec, tuple(devices), len({d.process_index for d in devices}))
