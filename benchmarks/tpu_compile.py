"""Every program a run uses, compiled ahead of time for a Cloud TPU slice on this machine
(no TPU needed): what fits on a chip, what a step costs, what its roofline allows.

    python benchmarks/tpu_compile.py --config=configs/imagenet1k.py --topology=v5e:4x4
    python benchmarks/tpu_compile.py --config=configs/cifar10.py --topology=v5e:2x4 --max_batch
    python benchmarks/tpu_compile.py --config=configs/imagenet1k.py --topology=v4:2x2x1 --batch 512 --programs train model

Needs libtpu (``pip install -e ".[tpu]"``); JAX then describes a slice's chips from its
topology (``jax.experimental.topologies``: generation, then chips per dimension, e.g.
``v5e:2x4`` = v5litepod-8, ``v4:2x2x1`` = v4-8, ``v5p:2x2x1`` = v5p-8, ``v6e:2x4`` =
v6e-8, ``v5e:8x8`` = v5litepod-64 on 16 hosts), and XLA's TPU compiler compiles for
them on the CPU. The programs are built as a run builds them, on a mesh made like
``sharding.make_mesh`` from the slice's devices, from abstract inputs (no data is read):

  * ``train``: the train step as ``train.lower_train_step`` builds it for the config's
    data path (``pipeline.DataShapes``: the batch gathered on the device from the
    replicated training set, or the host's two crops streamed in), with the interval
    metrics folded in;
  * ``mi``: the MI tracker (``mi_tracker.make_mi_tracker``) on its fixed batch;
  * ``features``: the evaluation program's feature extraction (``Backbone.apply``) on a
    batch of ``eval.batch_size`` centre images;
  * ``probe``: the linear probe's training (``linear_probe.probe_step_fn``): an epoch
    (a scan over its steps) on a device-held set, or a step on streamed crops;
  * ``model`` (not by default): benchmarks/train_step.py's ``model`` row, the network's
    own forward and backward for two views (ResNet + 2048-2048-2048 projector, Barlow
    Twins, SGD), at the config's batch and dtype.

For each: memory per chip (arguments, temporaries, outputs; their sum, less what the
donated state aliases, against the chip's HBM), FLOPs and bytes accessed per chip per
call (XLA's cost analysis of the partitioned program), the roofline lower bound on the
call's time from the chip's bf16 peak and HBM bandwidth (``CHIPS``; which of the two
binds), the images/s per chip that bound allows, and the collectives in the compiled
program (count and bytes per kind). The bound is a floor: float32 products at HIGHEST
run at a sixth of the bf16 peak, and no kernel reaches the peak. A program the TPU
compiler rejects (or that cannot fit) is one line, its error. The compiles run in a child
process: where libtpu itself crashes (a signal, not an error it reports: libtpu 0.0.42.1
on the v6e ResNet steps), the program's row says so, and the programs after it are
compiled in a fresh child. ``TPU_LIBRARY_PATH=/path/to/libtpu.so`` compiles with another
libtpu than the installed one (``pip download libtpu==X --no-deps``, unzipped); the
header names the one in use.

``--max_batch`` also finds the largest global batch whose train step fits in HBM (a
multiple of 8 per chip, at most the training set), a compile each: the next batch to try
is read off the memory of those compiled so far (``max_batch``).
``--breakdown`` prints the step's FLOPs piece by piece (online encoder, target, predictor,
objective, probe, augmentation, optimiser) beside the ``model`` row's, from lowered
programs only (seconds, no compile).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

# libtpu reads these when JAX loads it (at the first topology), and would otherwise ask
# the cloud metadata server what machine this is, and warn that it could not. This
# machine runs JAX on its CPU; the TPU compiler is only asked for programs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu takes /tmp/libtpu_lockfile for a process's lifetime (one TPU user per VM); any
# JAX process here that probed for a TPU holds it. Compiling needs no chip to itself.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from emim import sharding, train  # noqa: E402
from emim.backbone import backbone_from_model_config, model_config_of  # noqa: E402
from emim.config_base import VECTOR_SOURCES, load_config_file  # noqa: E402
from emim.data.pipeline import DataShapes  # noqa: E402
from emim.data.sources import input_shape  # noqa: E402
from emim.evaluators import linear_probe  # noqa: E402
from emim.evaluators import mi_tracker  # noqa: E402
from emim.tpu import libtpu_advice, libtpu_in_use  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  bf16_tflops: float  # peak dense bf16 FLOP/s per chip, 1e12
  hbm_gbps: float  # HBM bandwidth per chip, 1e9 bytes/s
  slice_name: str  # Cloud's accelerator type for n chips, "{n}" filled in


# Per chip, as Google publishes them (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, the
# "system architecture" tables, read 2026-11-30). v4 and v5p slices are named by
# TensorCores (2 per chip), v5e and v6e by chips.
CHIPS = {
    "v4": Chip(hbm_gib=32, bf16_tflops=275, hbm_gbps=1228, slice_name="v4-{cores}"),
    "v5e": Chip(hbm_gib=16, bf16_tflops=197, hbm_gbps=819, slice_name="v5litepod-{chips}"),
    "v5p": Chip(hbm_gib=95, bf16_tflops=459, hbm_gbps=2765, slice_name="v5p-{cores}"),
    "v6e": Chip(hbm_gib=32, bf16_tflops=918, hbm_gbps=1640, slice_name="v6e-{chips}"),
}

# Training-set sizes: a device-resident set is an input of the step (its whole size on
# every chip); for a streamed one it sets only the schedule's constants.
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet2012": 1_281_167, "imagenet100": 126_689}

PROGRAMS = ("train", "mi", "features", "probe")


# ----------------------------------------------------------------------------------
# The slice.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slice:
  topology: str
  generation: str
  chip: Chip
  devices: tuple
  hosts: int

  @property
  def name(self) -> str:
    n = len(self.devices)
    return self.chip.slice_name.format(chips=n, cores=2 * n)


def tpu_slice(topology: str) -> Slice:
  """The devices of a TPU slice, e.g. "v5e:2x4", for compiling on this machine."""
  generation = topology.split(":")[0]
  if generation not in CHIPS or ":" not in topology:
    raise SystemExit(f"--topology={topology!r}: give a generation ({', '.join(CHIPS)}) and chips per dimension, e.g. "
                     "v5e:2x4 (a v5litepod-8) or v4:2x2x1 (a v4-8).")
  from jax.experimental import topologies

  try:
    dims = [int(d) for d in topology.split(":")[1].split("x")]
  except ValueError:
    raise SystemExit(f"--topology={topology!r}: give the chips per dimension as numbers, e.g. v5e:2x4 or v4:2x2x1.")
  options = {}
  if generation in ("v4", "v5p"):  # a device per chip (its two TensorCores as one), as JAX runs them
    options["chip_config_name"] = "megacore"
  elif int(np.prod(dims)) <= 8:  # v5e-8 and v6e-8 are one VM of 8 chips (larger slices: VMs of 4)
    options["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
  try:
    devices = topologies.get_topology_desc(topology, "tpu", **options).devices
  except Exception as e:  # libtpu absent, or a shape the generation does not come in
    raise SystemExit(f"--topology={topology}: {one_line(e)} (libtpu installs with pip install -e \".[tpu]\").")
  return Slice(topology, generation, CHIPS[generation], tuple(devices), len({d.process_index for d in devices}))


def one_line(error: BaseException) -> str:
  """An XLA error in one line: its first line, and the HLO instruction it names."""
  text = str(error).strip()
  first = text.splitlines()[0] if text else type(error).__name__
  op = re.search(r"(%[\w.\-]+ = [^\n]{0,160})", text) or re.search(r'op_name="([^"]+)"', text)
  return (first[:300] + (f" [at {op.group(1)}]" if op else "")).strip()


# ----------------------------------------------------------------------------------
# The programs, abstract.
# ----------------------------------------------------------------------------------
def _abstract(tree, spec):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec), tree)


def with_batch(config, batch: int | None):
  config = config.copy_and_resolve_references()
  if batch:
    with config.unlocked():
      config.train.batch_size = batch
  return config


def num_train_examples(config) -> int:
  name = config.data.class_subset or config.data.tfds_name or config.data.source
  return TRAIN_EXAMPLES.get(name, config.data.num_train)


def lower_programs(config, mesh, programs=PROGRAMS) -> dict[str, tuple]:
  """{program: (lowered, images per call)} for the config on ``mesh``."""
  n_train = num_train_examples(config)
  batch = config.train.batch_size
  sharding.check_batch_size(batch, mesh)
  steps_per_epoch = max(n_train // batch, 1)
  total = config.train.num_steps or config.train.num_epochs * steps_per_epoch
  parts = train.build_parts(config, config.data.num_classes, steps_per_epoch, total)
  state, state_sharding = train.state_shapes(parts, mesh)
  state = _abstract(state, sharding.replicated(mesh))
  replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  vectors = config.data.source in VECTOR_SOURCES
  key, dtype = ("vectors", np.float32) if vectors else ("images", np.uint8)
  out = {}
  if "train" in programs:
    lowered, _ = train.lower_train_step(parts, DataShapes(config, mesh, n_train), state, state_sharding, mesh)
    out["train"] = (lowered, batch)
  if "mi" in programs and config.eval.mi_every_steps != 0:
    n, spec = mi_tracker.batch_layout(n_train, config.eval.mi_batch_size, mesh)
    inputs = {key: jax.ShapeDtypeStruct((n,) + input_shape(config.data), dtype, sharding=spec)}
    out["mi"] = (mi_tracker.make_mi_tracker(parts, objective_eps=config.method.get("eps", 1e-4)).lower(state, inputs), n)
  backbone = backbone_from_model_config(model_config_of(config), {})
  shape = input_shape(config.data)
  variables = _abstract(jax.eval_shape(lambda: backbone.model.init(jax.random.PRNGKey(0), np.zeros((1,) + shape,
                                                                                                     np.float32),
                                                                   train=False)), replicated)
  if "features" in programs:
    devices = mesh.devices.size
    n = max(devices, config.eval.batch_size - config.eval.batch_size % devices)  # as backbone.extract_features
    centre = shape if vectors else ((config.data.decode_size or config.data.image_size),) * 2 + (3,)
    images = jax.ShapeDtypeStruct((n,) + centre, dtype, sharding=batch_spec)
    out["features"] = (jax.jit(backbone.apply).lower(variables, images), n)
  if "probe" in programs and not vectors and config.eval.probe_mode == "augmented":
    n = linear_probe.probe_batch_size(config.eval, n_train, mesh)
    tx = linear_probe.probe_optimizer(config.eval, n, config.eval.probe_epochs * (n_train // n))
    probe_state = _abstract(jax.eval_shape(lambda: linear_probe.init_probe_state(
        backbone, config.data.num_classes, tx, config.seed)), replicated)
    step = linear_probe.probe_step_fn(backbone, tx, "augmented", precropped=config.data.stream)
    if config.data.stream:  # a step on a batch of the host's crops
      data = {"inputs": jax.ShapeDtypeStruct((n,) + shape, np.uint8, sharding=batch_spec),
              "labels": jax.ShapeDtypeStruct((n,), np.int32, sharding=batch_spec)}
      out["probe"] = (jax.jit(step, donate_argnums=0).lower(probe_state, data, variables), n)
    else:  # an epoch on the training set held on the devices; per step below
      data = {"inputs": jax.ShapeDtypeStruct((n_train, int(np.prod(shape))), np.uint8, sharding=replicated),
              "labels": jax.ShapeDtypeStruct((n_train,), np.int32, sharding=replicated)}
      epoch = linear_probe.probe_epoch_fn(step, n_train, n, batch_spec, shape)
      out["probe"] = (jax.jit(epoch, donate_argnums=0).lower(probe_state, data, variables), n * (n_train // n))
  if "model" in programs and not vectors:
    reference = _load_benchmark("train_step")
    step, init = reference.model_step(config, config.model.dtype)
    model_state = _abstract(jax.eval_shape(init, jax.random.PRNGKey(0)), replicated)
    x = jax.ShapeDtypeStruct((batch,) + shape, np.float32, sharding=batch_spec)
    out["model"] = (jax.jit(step, donate_argnums=0).lower(model_state, x, x), batch)
  return out


def _load_benchmark(name: str):
  path = pathlib.Path(__file__).resolve().parent / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"emim_benchmark_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------------
# What the compiled program says.
# ----------------------------------------------------------------------------------
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")


def shape_bytes(text: str) -> int:
  """Bytes of the arrays in an HLO type, e.g. "(f32[8,128]{1,0}, bf16[4])"."""
  return sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in _SHAPE.findall(text))


def _group_size(line: str, devices: int) -> int:
  """The devices each replica group of a collective spans."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
  return devices  # no groups: every device


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: int = 0  # each op's result, per chip
  widest_group: int = 0


def collectives(hlo: str, devices: int) -> dict[str, Collective]:
  """Per kind, the collectives of a compiled program (asynchronous ones counted at their
  start; the bytes are each op's result on one chip; an async start's result holds its
  operand too, so half of it is counted)."""
  out = collections.defaultdict(Collective)
  for line in hlo.splitlines():
    m = _COLLECTIVE.match(line)
    if not m:
      continue
    result, kind, start = m.groups()
    size = shape_bytes(result)
    if start and kind in ("all-gather", "collective-permute"):
      size //= 2
    c = out[kind]
    c.count += 1
    c.bytes += size
    c.widest_group = max(c.widest_group, _group_size(line, devices))
  return dict(out)


def entry_parameters(hlo: str) -> list[str]:
  """The per-chip shapes of the compiled program's parameters, from its entry layout."""
  m = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo)
  return [f"{t}[{d}]" for t, d in _SHAPE.findall(m.group(1))] if m else []


def products_by_precision(hlo: str, path_part: str) -> collections.Counter:
  """{"highest" | "default": count} of the matrix products (dot, convolution) whose
  source line (the compiled program's stack frames) is in a file whose path contains
  ``path_part``, e.g. "emim/objectives/"."""
  files = dict(re.findall(r'^(\d+) "([^"]*)"', _section(hlo, "FileNames"), re.M))
  locations = {i: f for i, f in re.findall(r"^(\d+) \{file_name_id=(\d+)", _section(hlo, "FileLocations"), re.M)}
  frames = {i: (loc, parent) for i, loc, parent in
            re.findall(r"^(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?", _section(hlo, "StackFrames"), re.M)}

  def in_path(frame: str, depth: int = 0) -> bool:
    if frame not in frames or depth > 64:
      return False
    loc, parent = frames[frame]
    if path_part in files.get(locations.get(loc, ""), ""):
      return True
    return bool(parent) and parent != frame and in_path(parent, depth + 1)

  counts = collections.Counter()
  for line in hlo.splitlines():
    if not re.search(r"= [^=]*\b(dot|convolution)\(", line):
      continue
    frame = re.search(r"stack_frame_id=(\d+)", line)
    if frame and in_path(frame.group(1)):
      counts["highest" if "operand_precision={highest,highest}" in line else "default"] += 1
  return counts


def _section(hlo: str, name: str) -> str:
  m = re.search(rf"^{name}\n(.*?)(?:\n\n|\Z)", hlo, re.M | re.S)
  return m.group(1) if m else ""


@dataclasses.dataclass
class Report:
  program: str
  images: int  # global images per call
  compile_s: float
  arguments: int = 0  # bytes per chip
  temporaries: int = 0
  outputs: int = 0
  aliased: int = 0
  flops: float = 0.0  # per chip per call
  bytes_accessed: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)
  error: str = ""
  hlo: str = ""
  hlo_error: str = ""  # the compiled program's text could not be read (its collectives unknown)

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries + self.outputs - self.aliased


def analyse(program: str, lowered, images: int, devices: int) -> Report:
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # what the TPU compiler rejects (or a program that cannot fit)
    return Report(program, images, time.perf_counter() - t0, error=one_line(e))
  report = Report(program, images, time.perf_counter() - t0)
  memory = compiled.memory_analysis()
  report.arguments, report.temporaries = memory.argument_size_in_bytes, memory.temp_size_in_bytes
  report.outputs, report.aliased = memory.output_size_in_bytes, memory.alias_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  report.flops, report.bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  try:
    report.hlo = compiled.as_text()
  except Exception as e:  # a libtpu newer than jaxlib can emit HLO that jaxlib cannot read back
    report.hlo_error = one_line(e)
    return report
  report.collectives = collectives(report.hlo, devices)
  return report


def compile_config(config, tpu: Slice, programs=PROGRAMS, each=None, note=None) -> list[Report]:
  """Each program of ``config`` compiled for the slice, one at a time (a ResNet-50 step
  takes minutes and GiBs of this machine's memory to compile); ``each(report)`` is
  called as each is done."""
  mesh = sharding.make_mesh(tpu.devices)
  lowered = lower_programs(config, mesh, programs)
  reports = []
  for name in [p for p in programs if p in lowered]:
    _note_compiling(name, lowered[name][1], len(tpu.devices), **(note or {}))
    reports.append(analyse(name, *lowered.pop(name), len(tpu.devices)))
    _note_compiling(None)
    if each is not None:
      each(reports[-1])
  return reports


@dataclasses.dataclass(frozen=True)
class Fit:
  """The train step at one batch, for ``max_batch``."""
  used: int | None  # bytes per chip (arguments + temporaries + outputs - aliased), where it compiled
  asked: int | None  # where the compiler ran out of HBM: the bytes per chip it asked for
  available: int | None  # the HBM the compiler said a chip has, where it said (a v5e's 15.75 of 16 GiB)
  why: str = ""  # why it does not fit; "" when it does
  out_of_memory: bool = False  # the compiler refused it for want of HBM (with or without figures)


# XLA's TPU out-of-HBM errors, in the two wordings libtpu has: (asked for, available).
_OUT_OF_HBM = (re.compile(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)"),
               re.compile(r"Used ([\d.]+)G of ([\d.]+)G hbm"))


def out_of_hbm(error: str) -> tuple[int, int] | None:
  """(bytes per chip asked for, HBM available) from XLA's TPU out-of-memory error; None for
  any other error. The figure it calls "HLO temporaries" counts the arguments and outputs
  too (measured: 12 GiB of arguments and 6.25 of outputs were "18.25G")."""
  m = next((m for m in (p.search(error) for p in _OUT_OF_HBM) if m), None)
  return (int(float(m.group(1)) * GiB), int(float(m.group(2)) * GiB)) if m else None


def train_memory(config, tpu: Slice, batch: int, report: Report | None = None) -> Fit:
  """The train step compiled at global ``batch`` (or its ``report``, compiled already): its
  memory per chip, and whether it fits in the chip's HBM."""
  report = report or compile_config(with_batch(config, batch), tpu, ("train",), note={"max_batch": True})[0]
  ok = not report.error and report.total <= tpu.chip.hbm_gib * GiB
  # The FLOPs per image show what fitting costs, where XLA recomputes activations to fit.
  why = report.error or (f"{report.total / GiB:.2f} GiB, "
                         f"{report.flops * len(tpu.devices) / batch / 1e9:.3g} GFLOP per image")
  print(f"  batch {batch}: {'fits' if ok else 'does not fit'} ({why}; compiled in {report.compile_s:.0f}s)", flush=True)
  if report.error:
    asked, available = out_of_hbm(report.error) or (None, None)
    refused = asked is not None or "RESOURCE_EXHAUSTED" in report.error or "out of memory" in report.error.lower()
    return Fit(None, asked, available, why, out_of_memory=refused)
  return Fit(report.total, None, None, "" if ok else why)


def max_batch(config, tpu: Slice, multiple: int, compiled: Report | None = None) -> int:
  """The largest global batch, a multiple of ``multiple``, whose train step fits in HBM;
  0 when even ``multiple`` does not.

  Each try is a compile (minutes for a ResNet-50 step), so the next batch to try is read
  off the memory of those compiled so far: a step's memory grows close to linearly with
  its batch (the state is fixed, the activations scale), so the line through the two
  largest batches measured, solved for the chip's HBM, lands on or next to the answer,
  and the batch one multiple above it closes the bracket. A batch the compiler refuses
  for want of HBM counts too: its error says the memory it asked for and the HBM it had.
  Where the line misleads (memory that jumps with the compiler's choices), every third try
  halves the bracket, so the search always ends, at worst in about three times
  bisection's compiles. No batch beyond the training set is tried (an epoch is one step
  there). A compile that fails for another reason than memory ends the search (SystemExit:
  no batch would compile). ``compiled``: the train step at the config's batch, where the
  table compiled it already."""
  limit = tpu.chip.hbm_gib * GiB
  memory: dict[int, int] = {}  # batch -> bytes per chip, compiled or (out of HBM) asked for
  lo, hi = 0, None  # the largest batch known to fit; the smallest known not to
  cap = max(multiple, num_train_examples(config) // multiple * multiple)
  batch = min(cap, max(multiple, config.train.batch_size - config.train.batch_size % multiple))
  attempt = 0
  while True:
    attempt += 1
    if compiled is not None and compiled.images == batch:
      fit, compiled = train_memory(config, tpu, batch, compiled), None
    else:
      fit = train_memory(config, tpu, batch)
    if fit.why and fit.used is None and not fit.out_of_memory:
      raise SystemExit(f"--max_batch: the train step at batch {batch} failed to compile, not for want of HBM: "
                       f"{fit.why}")
    if fit.used is not None or fit.asked is not None:
      memory[batch] = fit.used if fit.used is not None else fit.asked
    limit = min(limit, fit.available or limit)
    lo, hi = (batch, hi) if not fit.why else (lo, batch)
    if (hi is not None and hi - lo <= multiple) or lo == cap:
      return lo
    if hi is None and len(memory) < 2:
      batch = min(2 * lo, cap)  # a second point for the line
      continue
    top = sorted(memory)[-2:]
    guess = None
    if len(top) == 2 and memory[top[1]] > memory[top[0]]:
      slope = (memory[top[1]] - memory[top[0]]) / (top[1] - top[0])
      guess = int((top[1] + (limit - memory[top[1]]) / slope) // multiple * multiple)
    if hi is None:
      batch = min(max(guess, lo + multiple), 8 * lo) if guess else 2 * lo  # no upper bound yet: at most 8x
      batch = min(batch, cap)
    elif guess is None or attempt % 3 == 0:
      batch = (lo + hi) // 2 // multiple * multiple  # halve the bracket
    else:
      batch = guess
    batch = max(lo + multiple, min(batch, hi - multiple)) if hi is not None else batch


# ----------------------------------------------------------------------------------
# Where the step's FLOPs go.
# ----------------------------------------------------------------------------------
def flops_breakdown(config) -> dict[str, float]:
  """Global FLOPs per step of the train step and of its pieces, each lowered alone on the
  step's shapes for one CPU device (XLA's cost analysis of the program before
  partitioning and fusion, which only the CPU client gives; no compile): the
  ``model`` row (the network's forward and backward of two views), the online encoder's
  forward and backward of both views, the target's forwards, the predictor, the
  objective's forward and backward, the online probe, the two augmented views, the
  optimiser's update, and the whole step."""
  from emim.methods import Views
  from emim.train_step import _apply_views, make_views

  import jax.numpy as jnp

  mesh = sharding.make_mesh(jax.devices("cpu")[:1])
  n_train = num_train_examples(config)
  batch = config.train.batch_size
  parts = train.build_parts(config, config.data.num_classes, max(n_train // batch, 1), 1000)
  state, state_sharding = train.state_shapes(parts, mesh)
  state = _abstract(state, sharding.replicated(mesh))
  batch_spec = sharding.batch_sharding(mesh)
  shape = input_shape(config.data)
  flops = lambda fn, *args: float(jax.jit(fn).lower(*args).cost_analysis().get("flops", 0.0))
  x = jax.ShapeDtypeStruct((batch,) + shape, np.float32, sharding=batch_spec)
  out = {"whole step": float(train.lower_train_step(parts, DataShapes(config, mesh, n_train), state, state_sharding,
                                                    mesh)[0].cost_analysis().get("flops", 0.0))}
  reference = _load_benchmark("train_step")
  step, init = reference.model_step(config, config.model.dtype)
  out["model row (network fwd+bwd, two views)"] = flops(step, _abstract(jax.eval_shape(init, jax.random.PRNGKey(0)),
                                                                        sharding.replicated(mesh)), x, x)
  enc = lambda p, s, a, b: _apply_views(parts.encoder, parts.views_encoder, p, s, a, b)
  enc_stats = state.batch_stats["encoder"]
  out["online encoder fwd+bwd, two views"] = flops(
      lambda p, s, a, b: jax.grad(lambda q: sum(jnp.sum(o[1]) for o in enc(q, s, a, b)[0]))(p),
      state.params["encoder"], enc_stats, x, x)
  (o1, _), _ = jax.eval_shape(enc, state.params["encoder"], enc_stats, x, x)
  z = jax.ShapeDtypeStruct(o1[1].shape, o1[1].dtype, sharding=batch_spec)
  if state.target is not None:
    out["target forward, two views"] = flops(
        lambda t, a, b: _apply_views(parts.encoder, parts.views_encoder, t["params"], t["batch_stats"], a, b)[0],
        state.target, x, x)
  pred = None
  if parts.predictor is not None:
    out["predictor fwd+bwd, two views"] = flops(lambda p, s, a, b: jax.grad(lambda q: sum(
        jnp.sum(y) for y in _apply_views(parts.predictor, parts.views_predictor, q, s, a, b)[0]))(p),
        state.params["predictor"], state.batch_stats["predictor"], z, z)
    pred = (z, z)

  def objective(a, b, objective_state):
    views = lambda u: Views((u, b), None if pred is None else (u, b), None if state.target is None else (b, u))
    return jax.grad(lambda u: parts.method.loss(views(u), objective_state)[0])(a)

  out["objective fwd+bwd (float32, HIGHEST)"] = flops(objective, z, z, state.objective_state)
  f = jax.ShapeDtypeStruct(o1[0].shape, np.float32, sharding=batch_spec)
  labels = jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_spec)

  def probe(params, feats, labels):
    import flax.linen as nn
    import optax

    return jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        nn.Dense(parts.num_classes).apply({"params": q}, feats), labels).mean())(params)

  out["online probe fwd+bwd"] = flops(probe, state.probe_params, f, labels)
  if not config.data.stream and config.data.source not in VECTOR_SOURCES:
    images = {"images": jax.ShapeDtypeStruct((batch,) + shape, np.uint8, sharding=batch_spec)}
  else:
    images = {"views": jax.ShapeDtypeStruct((batch, 2) + shape, np.uint8, sharding=batch_spec)} \
        if config.data.stream else {"vectors": x}
  out["augmentation, two views"] = flops(lambda r, s, b: make_views(parts, r, s, b), state.rng, state.step, images)
  out["optimiser update"] = flops(lambda p, o, g: parts.tx.update(g, o, p), state.params, state.opt_state, state.params)
  return out


# ----------------------------------------------------------------------------------
# A crash of the compiler.
# ----------------------------------------------------------------------------------
# Set in the child process that compiles: a file it names the program it is compiling in.
_STATUS = "EMIM_TPU_COMPILE_STATUS"


def _note_compiling(program: str | None, images: int = 0, devices: int = 1, **extra) -> None:
  """In the compiling child, the program it is about to compile (None: between compiles),
  for the parent to name if the compiler crashes; written whole or not at all."""
  path = os.environ.get(_STATUS)
  if path:
    with open(path + ".tmp", "w") as f:
      json.dump({"program": program, "images": images, "devices": devices, "libtpu": libtpu_in_use()[0],
                 "since": time.time(), **extra}, f)
    os.replace(path + ".tmp", path)


def _read_status(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # none written yet
    return {}


def _child_argv(args, programs: list[str], first: bool, max_batch: bool) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), f"--config={args.config}", f"--topology={args.topology}",
          "--programs", *programs]
  argv += [f"--batch={args.batch}"] if args.batch else []
  argv += ["--max_batch"] if max_batch else []
  argv += ["--breakdown"] if args.breakdown and first else []
  argv += [] if first else ["--no_header"]
  return argv


# The signals a crash of native code dies of; any other came from outside the process.
_CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


def crash_line(status: dict, returncode: int, table: bool) -> str:
  """A child that died of a signal, in one line: a table row (``table``) or a line of
  ``--max_batch``'s when it died compiling a program, else a sentence."""
  try:
    name = signal.Signals(-returncode).name
  except ValueError:
    name = f"signal {-returncode}"
  program = status.get("program")
  if -returncode == signal.SIGKILL:  # no crash of libtpu's sends it: most often the kernel's out-of-memory killer
    what = ("killed (SIGKILL: most often this machine's out-of-memory killer; a ResNet-50 step takes up to 10 GiB "
            "of it to compile)")
  elif -returncode not in _CRASHES:  # sent from outside (SIGTERM, SIGHUP): not the compiler's doing
    what = f"stopped by {name}, sent from outside"
  elif not status:
    return f"The compiling process died of {name} before its first compile."
  elif program is None:
    return f"libtpu {status.get('libtpu')} crashed ({name}) after the last compile; the rows above stand."
  else:
    what = (f"libtpu {status.get('libtpu')} crashed compiling it ({name}, {time.time() - status['since']:.0f} s in): "
            "a crash inside XLA's TPU compiler, not an error it reports; another libtpu may compile it "
            "(TPU_LIBRARY_PATH=.../libtpu.so)")
  if program is None:
    return f"The compiling process was {what}."
  images, devices = status.get("images", 0), status.get("devices", 1)
  if status.get("max_batch"):
    return f"  batch {images}: failed: {what}"
  return f"| {program} | {images} ({images // devices}) | failed: {what} |" if table else f"{program}: failed: {what}"


def supervise(args, child_argv=_child_argv) -> int:
  """Runs the compiles in a child process, its output passed on; where the child dies of
  a signal (libtpu crashed), reports the program it was compiling and goes on with the
  programs after it in a fresh child (``--max_batch`` after them, unless the train step
  is what crashed). The exit status: the child's; 1 after a crash; 130 on an interrupt.
  The child never outlives it."""
  programs, first, crashed, max_batch = list(args.programs), True, False, args.max_batch
  while True:
    with tempfile.TemporaryDirectory(prefix="emim-tpu-compile-") as tmp:
      status_path = os.path.join(tmp, "compiling.json")
      child = subprocess.Popen(child_argv(args, programs, first, max_batch), stdout=subprocess.PIPE, text=True,
                               env={**os.environ, _STATUS: status_path})
      table = False
      try:
        for line in child.stdout:
          table = table or line.startswith("| program |")
          print(line, end="", flush=True)
        returncode = child.wait()
      finally:  # an interrupt, or SIGTERM (main()): a compile left running holds minutes of CPU and GiBs
        if child.poll() is None:
          child.kill()
          child.wait()
      status = _read_status(status_path)
    if returncode == -signal.SIGINT:
      return 130
    if returncode >= 0:
      return 1 if crashed else returncode
    crashed = True
    print(crash_line(status, returncode, table or not first), flush=True)
    program = status.get("program")
    if status.get("max_batch"):  # in the search, after the table: nothing is left to compile
      return 1
    if program == "train" and max_batch:  # its search would compile the step that died, again
      print("--max_batch: not searched, the train step's compile died.", flush=True)
      max_batch = False
    if program not in programs:  # before the first compile or after the last
      return 1
    programs, first = programs[programs.index(program) + 1:], False
    if not programs and not max_batch:
      return 1


# ----------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------
def roofline(report: Report, chip: Chip, devices: int) -> tuple[float, float, str, float]:
  """(seconds per call at the bf16 peak, at the HBM bandwidth, which binds: "compute" or
  "memory", images/s per chip at the larger)."""
  compute = report.flops / (chip.bf16_tflops * 1e12)
  memory = report.bytes_accessed / (chip.hbm_gbps * 1e9)
  bound = max(compute, memory)
  return compute, memory, "compute" if compute >= memory else "memory", report.images / devices / max(bound, 1e-12)


def format_collectives(report: Report) -> str:
  if report.hlo_error:
    return f"unknown: jaxlib could not read the compiled HLO back ({report.hlo_error})"
  return ", ".join(f"{k} {c.count}x {c.bytes / 2**20:.1f} MiB" for k, c in sorted(report.collectives.items())) or "none"


TABLE_HEADER = ("| program | images/call (per chip) | args GiB | temps GiB | outputs GiB | total GiB (of HBM) | GFLOP/chip "
                "| GB/chip | roofline ms: compute / memory (binds) | images/s/chip ceiling | collectives (count, bytes/chip) | compile s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: Report, tpu: Slice) -> str:
  n = len(tpu.devices)
  if r.error:
    return f"| {r.program} | {r.images} ({r.images // n}) | failed: {r.error} |"
  compute, memory, binds, rate = roofline(r, tpu.chip, n)
  return (f"| {r.program} | {r.images} ({r.images / n:g}) | {r.arguments / GiB:.2f} | {r.temporaries / GiB:.2f} | "
          f"{r.outputs / GiB:.2f} | {r.total / GiB:.2f} ({100 * r.total / (tpu.chip.hbm_gib * GiB):.0f}% of "
          f"{tpu.chip.hbm_gib:g}) | {r.flops / 1e9:.1f} | {r.bytes_accessed / 1e9:.2f} | {compute * 1e3:.1f} / "
          f"{memory * 1e3:.1f} ({binds}) | "
          f"{rate:.0f} | {format_collectives(r)} | {r.compile_s:.0f} |")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file[:variant]")
  parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, v5e:8x8")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
  parser.add_argument("--programs", nargs="*", default=list(PROGRAMS), choices=PROGRAMS + ("model",))
  parser.add_argument("--max_batch", action="store_true", help="also find the largest global batch that fits")
  parser.add_argument("--breakdown", action="store_true",
                      help="also the step's FLOPs piece by piece beside the model row's (lowered only: fast)")
  parser.add_argument("--no_header", action="store_true", help=argparse.SUPPRESS)  # a child after a crash
  args = parser.parse_args(argv)
  if not args.programs and not (args.max_batch or args.breakdown):
    parser.error(f"--programs: name at least one of {', '.join(PROGRAMS + ('model',))}")
  return args


def main():
  args = parse_args()
  if _STATUS not in os.environ:  # the parent: compiles in a child that a crash of libtpu cannot take down with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that it stops the child
    try:
      sys.exit(supervise(args))
    except KeyboardInterrupt:
      sys.exit(130)
  path, _, variant = args.config.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"--config={args.config}: no such file (the configs are configs/*.py).")
  config = with_batch(load_config_file(path, variant or None), args.batch)
  tpu = tpu_slice(args.topology)
  n = len(tpu.devices)
  if config.train.batch_size % n:
    raise SystemExit(f"The global batch {config.train.batch_size} does not split over the {n} chips of {tpu.name}: "
                     f"--batch {max(n, config.train.batch_size - config.train.batch_size % n)} would.")
  if not args.no_header:
    version, library = libtpu_in_use()
    print(f"{args.config} on {tpu.name} ({args.topology}: {n} chips, {tpu.hosts} host(s), {tpu.devices[0].device_kind}); "
          f"batch {config.train.batch_size} ({config.train.batch_size // n} per chip), {config.model.backbone} "
          f"{config.model.dtype}; jax {jax.__version__}, libtpu {version} ({library})", flush=True)
    advice = libtpu_advice(tpu.devices[0].device_kind, version)
    if advice:
      print(f"Known: {advice}", file=sys.stderr, flush=True)
  if args.breakdown:
    pieces = flops_breakdown(config)
    model = pieces["model row (network fwd+bwd, two views)"]
    print("| piece of the step (global, before fusion) | GFLOP | / model row |\n|---|---|---|")
    for name, value in pieces.items():
      print(f"| {name} | {value / 1e9:.1f} | {value / model:.3f} |")
    print(f"| rest (whole - pieces) | {(pieces['whole step'] - sum(v for k, v in pieces.items() if k not in ('whole step', 'model row (network fwd+bwd, two views)'))) / 1e9:.1f} | |", flush=True)
    if args.programs == list(PROGRAMS) and not args.max_batch:
      return
  if not args.no_header and args.programs:
    print(TABLE_HEADER, flush=True)
  reports = compile_config(config, tpu, tuple(args.programs), each=lambda r: print(table_row(r, tpu), flush=True)) \
      if args.programs else []
  if args.max_batch:
    print("Largest global batch whose train step fits:", flush=True)
    best = max_batch(config, tpu, 8 * n, next((r for r in reports if r.program == "train"), None))
    whole = best == num_train_examples(config) // (8 * n) * (8 * n)
    print(f"max_batch {best} ({best // n} per chip) on {tpu.name}"
          f"{' (the whole training set: no larger batch tried)' if whole else ''}", flush=True)
  if any(r.error for r in reports):
    sys.exit(1)


if __name__ == "__main__":
  main()
