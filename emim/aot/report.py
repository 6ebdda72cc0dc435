"""A program compiled for a target, and what the compiler says of it: memory per device
(arguments, temporaries, outputs; their sum, less what the donated state aliases, against
the device's memory), FLOPs and bytes accessed per device per call (XLA's cost analysis
of the partitioned program), the roofline lower bound on the call's time from the
device's bf16 peak and memory bandwidth (which of the two binds), the images/s per
device that bound allows, and the collectives in the compiled program (count and bytes
per kind). The bound is a floor, a compiler's estimate and not a timing: float32 products
at HIGHEST run at a fraction of the bf16 peak, and no kernel reaches the peak.

XLA's GPU compiler gives no cost analysis (``compiled.cost_analysis()`` is None, and so
is the lowered program's on a GPU client): for a GPU the FLOPs are the same program's
lowered for one CPU device (XLA's HLO cost analysis before partitioning and fusion: the
global count, divided here by the GPUs), the bytes accessed are unknown, and the
roofline is the compute bound alone.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time

import numpy as np

from emim import sharding
from emim.aot.programs import PROGRAMS, lower_programs
from emim.aot.supervisor import note_compiling
from emim.aot.targets import Chip, Target, usable_bytes

GiB = 2**30


def one_line(error: BaseException) -> str:
  """An XLA error in one line: its first line, and the HLO instruction it names."""
  text = str(error).strip()
  first = text.splitlines()[0] if text else type(error).__name__
  op = re.search(r"(%[\w.\-]+ = [^\n]{0,160})", text) or re.search(r'op_name="([^"]+)"', text)
  return (first[:300] + (f" [at {op.group(1)}]" if op else "")).strip()

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
  # Where flops and bytes_accessed come from: "compiled" (the partitioned program's cost
  # analysis), "lowered" (FLOPs only: the CPU's lowering, global / devices), "" (none).
  cost_source: str = ""
  compiled_with: str = ""  # compiler options it needed to compile, where it needed any (said under the table)
  on_cublas: bool = False  # compiled (or refused for want of memory) with its products on cuBLAS

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries + self.outputs - self.aliased


# XLA's GPU compiler without a GPU cannot autotune: each Triton GEMM fusion gets the one
# tiling its rules choose, and a fusion whose constraints that tiling breaks fails the whole
# compile (a ViT's attention output projection, whose operand merges batch and tokens:
# "Couldn't find output tile sizes that satisfy hlo: %dot... = bf16[25216,384]"). On a GPU
# the autotuner tries tilings and cuBLAS (xla_gpu_cublas_fallback). Such a program is
# compiled again with its products on cuBLAS, and the table says so.
NO_TRITON_TILING = "Couldn't find output tile sizes"
PRODUCTS_ON_CUBLAS = {"xla_gpu_enable_triton_gemm": False}


def out_of_memory(error: str) -> bool:
  """Whether a compile's error is the compiler refusing the program for want of memory."""
  return "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower()


def analyse(program: str, lowered, images: int, devices: int, global_flops: float | None = None,
            on_cublas: bool = False) -> Report:
  """The program compiled, and read. ``global_flops``: the whole program's FLOPs from
  elsewhere (the CPU's lowering), used where the compiler gives no cost analysis.
  ``on_cublas``: compile with the products on cuBLAS at once, where the same program at
  another batch needed it (``--max_batch``: each try would otherwise fail first)."""
  t0 = time.perf_counter()
  compiled_with = ""
  try:
    compiled = lowered.compile(compiler_options=PRODUCTS_ON_CUBLAS) if on_cublas else lowered.compile()
    if on_cublas:
      compiled_with = ("compiled with --xla_gpu_enable_triton_gemm=false at once: the step at another batch had "
                       "no Triton tiling without a GPU")
  except Exception as e:  # what the compiler rejects (or a program that cannot fit)
    if on_cublas or NO_TRITON_TILING not in str(e):
      return Report(program, images, time.perf_counter() - t0, error=one_line(e), on_cublas=on_cublas)
    try:
      compiled = lowered.compile(compiler_options=PRODUCTS_ON_CUBLAS)
    except Exception as again:  # the first error is the one to show, unless on cuBLAS it ran out of memory:
      if out_of_memory(one_line(again)):  # then memory is what stands in the way (--max_batch: a batch too large)
        return Report(program, images, time.perf_counter() - t0, on_cublas=True, error=(
            f"{one_line(again)} (with --xla_gpu_enable_triton_gemm=false: XLA found no Triton tiling without a GPU)"))
      return Report(program, images, time.perf_counter() - t0, error=one_line(e))
    first = one_line(e)
    compiled_with = ("compiled with --xla_gpu_enable_triton_gemm=false: without a GPU to autotune on, XLA found "
                     f"no Triton tiling for a matrix product ({first[:160] + '...' * (len(first) > 160)}); a GPU's "
                     "autotuner chooses among tilings and cuBLAS itself, so a run there may fuse differently")
  report = Report(program, images, time.perf_counter() - t0, compiled_with=compiled_with, on_cublas=bool(compiled_with))
  memory = compiled.memory_analysis()
  report.arguments, report.temporaries = memory.argument_size_in_bytes, memory.temp_size_in_bytes
  report.outputs, report.aliased = memory.output_size_in_bytes, memory.alias_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) and cost else cost
  if cost:
    report.flops, report.bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    report.cost_source = "compiled"
  elif global_flops is not None:  # XLA's GPU compiler: no cost analysis
    report.flops, report.cost_source = global_flops / devices, "lowered"
  try:
    report.hlo = compiled.as_text()
  except Exception as e:  # a libtpu newer than jaxlib can emit HLO that jaxlib cannot read back
    report.hlo_error = one_line(e)
    return report
  report.collectives = collectives(report.hlo, devices)
  return report


def compile_config(config, target: Target, programs=PROGRAMS, each=None, note=None, on_cublas=False) -> list[Report]:
  """Each program of ``config`` compiled for the target, one at a time (a ResNet-50 step
  takes minutes and GiBs of this machine's memory to compile); ``each(report)`` is
  called as each is done."""
  n = len(target.devices)
  lowered = lower_programs(config, sharding.make_mesh(target.devices), programs)
  cpu_flops = {}
  if target.spec.platform != "tpu":  # no cost analysis from the GPU compiler: the FLOPs from the CPU's lowering
    import jax

    cpu = lower_programs(config, sharding.make_mesh(jax.devices("cpu")[:1]), programs)
    cpu_flops = {name: float((low.cost_analysis() or {}).get("flops", 0.0)) for name, (low, _) in cpu.items()}
  reports = []
  for name in [p for p in programs if p in lowered]:
    note_compiling(name, lowered[name][1], n, compiler=target.compiler, **(note or {}))
    reports.append(analyse(name, *lowered.pop(name), n, cpu_flops.get(name), on_cublas=on_cublas))
    note_compiling(None)
    if each is not None:
      each(reports[-1])
  return reports


# ----------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------
def roofline(report: Report, chip: Chip, devices: int) -> tuple[float, float | None, str, float]:
  """(seconds per call at the bf16 peak, at the memory bandwidth (None where the bytes are
  unknown), which binds: "compute" or "memory", images/s per device at the larger)."""
  compute = report.flops / (chip.bf16_tflops * 1e12)
  memory = report.bytes_accessed / (chip.hbm_gbps * 1e9) if report.cost_source == "compiled" else None
  bound = max(compute, memory or 0.0)
  binds = "compute" if memory is None or compute >= memory else "memory"
  return compute, memory, binds, report.images / devices / max(bound, 1e-12)


def format_collectives(report: Report) -> str:
  if report.hlo_error:
    return f"unknown: jaxlib could not read the compiled HLO back ({report.hlo_error})"
  return ", ".join(f"{k} {c.count}x {c.bytes / 2**20:.1f} MiB" for k, c in sorted(report.collectives.items())) or "none"


def table_header(unit: str = "chip") -> str:
  return (f"| program | images/call (per {unit}) | args GiB | temps GiB | outputs GiB | total GiB (of memory) "
          f"| GFLOP/{unit} | GB/{unit} | roofline ms: compute / memory (binds) | images/s/{unit} ceiling "
          f"| collectives (count, bytes/{unit}) | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


TABLE_HEADER = table_header()


def table_row(r: Report, target: Target) -> str:
  n = len(target.devices)
  if r.error:
    return f"| {r.program} | {r.images} ({r.images // n}) | failed: {r.error} |"
  chip = target.chip
  usable = usable_bytes(target)
  over = (f": over the {usable / GiB:.3g} GiB pool, does not fit" if usable < chip.hbm_gib * GiB else
          ": does not fit") if r.total > usable else ""
  memory_cells = (f"{r.arguments / GiB:.2f} | {r.temporaries / GiB:.2f} | {r.outputs / GiB:.2f} | {r.total / GiB:.2f} "
                  f"({100 * r.total / (chip.hbm_gib * GiB):.0f}% of {chip.hbm_gib:.3g}{over})")
  if not r.cost_source:
    return (f"| {program_cell(r)} | {r.images} ({r.images / n:g}) | {memory_cells} | no cost analysis | | | | "
            f"{format_collectives(r)} | {r.compile_s:.0f} |")
  compute, memory, binds, rate = roofline(r, chip, n)
  if r.cost_source == "compiled":
    flops, traffic, bound = f"{r.flops / 1e9:.1f}", f"{r.bytes_accessed / 1e9:.2f}", \
        f"{compute * 1e3:.1f} / {memory * 1e3:.1f} ({binds})"
  else:  # the CPU's lowering: global FLOPs / devices; the bytes are unknown
    flops, traffic, bound = f"{r.flops / 1e9:.1f} (lowered, /{n})", "unknown", f"{compute * 1e3:.1f} / unknown (compute only)"
  return (f"| {program_cell(r)} | {r.images} ({r.images / n:g}) | {memory_cells} | {flops} | {traffic} | {bound} | "
          f"{rate:.0f} | {format_collectives(r)} | {r.compile_s:.0f} |")


def program_cell(r: Report) -> str:
  return f"{r.program} (*)" if r.compiled_with else r.program


def footnotes(reports) -> list[str]:
  """What the table's starred rows needed to compile."""
  return [f"(*) {r.program}: {r.compiled_with}." for r in reports if r.compiled_with]
