"""The largest global batch whose train step fits in a device's memory (``--max_batch``),
a compile each."""

from __future__ import annotations

import dataclasses
import re

from emim.aot.programs import num_train_examples, with_batch
from emim.aot.report import GiB, Report, compile_config, out_of_memory
from emim.aot.targets import Target, usable_bytes
from emim.errors import UserError


class SearchError(UserError):
  """The train step compiles at no batch, for another reason than memory."""


@dataclasses.dataclass(frozen=True)
class Fit:
  """The train step at one batch, for ``max_batch``."""
  used: int | None  # bytes per chip (arguments + temporaries + outputs - aliased), where it compiled
  asked: int | None  # where the compiler ran out of HBM: the bytes per chip it asked for
  available: int | None  # the HBM the compiler said a chip has, where it said (a v5e's 15.75 of 16 GiB)
  why: str = ""  # why it does not fit; "" when it does
  out_of_memory: bool = False  # the compiler refused it for want of HBM (with or without figures)
  on_cublas: bool = False  # it compiled (or ran out of memory) only with its products on cuBLAS (NO_TRITON_TILING)


# XLA's TPU out-of-HBM errors, in the two wordings libtpu has: (asked for, available).
_OUT_OF_HBM = (re.compile(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)"),
               re.compile(r"Used ([\d.]+)G of ([\d.]+)G hbm"))


def out_of_hbm(error: str) -> tuple[int, int] | None:
  """(bytes per chip asked for, HBM available) from XLA's TPU out-of-memory error; None for
  any other error. The figure it calls "HLO temporaries" counts the arguments and outputs
  too (measured: 12 GiB of arguments and 6.25 of outputs were "18.25G")."""
  m = next((m for m in (p.search(error) for p in _OUT_OF_HBM) if m), None)
  return (int(float(m.group(1)) * GiB), int(float(m.group(2)) * GiB)) if m else None


def train_memory(config, target: Target, batch: int, report: Report | None = None, on_cublas: bool = False) -> Fit:
  """The train step compiled at global ``batch`` (or its ``report``, compiled already): its
  memory per chip, and whether it fits what a run may use of it (``usable_bytes``: a TPU's
  HBM, a GPU's JAX pool). ``on_cublas``: its products on cuBLAS from the start."""
  report = report or compile_config(with_batch(config, batch), target, ("train",), note={"max_batch": True},
                                    on_cublas=on_cublas)[0]
  ok = not report.error and report.total <= usable_bytes(target)
  # The FLOPs per image show what fitting costs, where XLA recomputes activations to fit.
  why = report.error or (f"{report.total / GiB:.2f} GiB, "
                         f"{report.flops * len(target.devices) / batch / 1e9:.3g} GFLOP per image")
  print(f"  batch {batch}: {'fits' if ok else 'does not fit'} ({why}; compiled in {report.compile_s:.0f}s"
        f"{', its products on cuBLAS: no Triton tiling found without a GPU' if report.compiled_with else ''})",
        flush=True)  # (said here: the table's footnote is there only where the table's step needed it too)
  if report.error:
    asked, available = out_of_hbm(report.error) or (None, None)
    refused = asked is not None or out_of_memory(report.error)
    return Fit(None, asked, available, why, out_of_memory=refused, on_cublas=report.on_cublas)
  return Fit(report.total, None, None, "" if ok else why, on_cublas=report.on_cublas)


def max_batch(config, target: Target, multiple: int, compiled: Report | None = None) -> int:
  """The largest global batch, a multiple of ``multiple``, whose train step fits (``usable_bytes``);
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
  there). A compile that fails for another reason than memory ends the search (SearchError:
  no batch would compile). ``compiled``: the train step at the config's batch, where the
  table compiled it already. Once a try (or ``compiled``) compiled only with its products on
  cuBLAS (a ViT's on a GPU, without a GPU to autotune), the later tries compile that way at
  once: each would fail first otherwise, a wasted compile."""
  limit = usable_bytes(target)  # a GPU's: JAX's pool (targets.memory_pool)
  memory: dict[int, int] = {}  # batch -> bytes per chip, compiled or (out of HBM) asked for
  lo, hi = 0, None  # the largest batch known to fit; the smallest known not to
  cap = max(multiple, num_train_examples(config) // multiple * multiple)
  batch = min(cap, max(multiple, config.train.batch_size - config.train.batch_size % multiple))
  # The table's step, at any batch, needing cuBLAS tells the first try too (the config's batch may be no multiple).
  attempt, on_cublas = 0, compiled is not None and compiled.on_cublas
  while True:
    attempt += 1
    if compiled is not None and compiled.images == batch:
      fit, compiled = train_memory(config, target, batch, compiled), None
    else:
      fit = train_memory(config, target, batch, on_cublas=on_cublas)
    on_cublas = on_cublas or fit.on_cublas
    if fit.why and fit.used is None and not fit.out_of_memory:
      raise SearchError(f"--max_batch: the train step at batch {batch} failed to compile, not for want of HBM: "
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
