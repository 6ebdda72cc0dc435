"""Where a compiled program's memory traffic goes: the bytes each instruction of the
compiled HLO reads and writes, summed by the piece of the train step it belongs to.

XLA's cost analysis gives one figure for a whole program ("bytes accessed"). The compiled
program's text names, for every instruction XLA emits (a fusion, a convolution, a copy, a
collective), the shapes it reads and writes, their layouts in the device's memory, and the
``op_name`` of the JAX operation it came from; ``train_step.py`` names its pieces with
``jax.named_scope`` (augment, online, predictor, target, objective, optimizer, norms, probe,
ema_update, guard, metrics), so each instruction's bytes can be given to its piece.

An instruction's bytes are its operands' and its results' sizes, as laid out: on a TPU
an array's two minor dimensions are stored in tiles (``T(8,128)``: the minor-most padded to
a multiple of 128, the next to 8), so an array whose minor dimension is small occupies
more than its elements. A fusion that only slices an operand reads the slices, one that
updates a buffer in place writes the update, a prefetch moves its destination, a loop's
body counts once per trip (``bytes_by_piece``). The sum is a reading of the compiler's
plan, not its cost analysis: the two differ (docs/aot.md, "Where a step's bytes go").
"""

from __future__ import annotations

import collections
import re

_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:, .*)?$")
_CONTROL_FLOW = ("while", "conditional", "call")
# Instructions that move no data of their own (views, tuples, the ends of async pairs).
_FREE = {"get-tuple-element", "tuple", "parameter", "constant", "bitcast", "partition-id", "replica-id", "after-all",
         "opt-barrier"}
# Custom calls that only reinterpret their operands (a TPU concatenation of slices already
# laid out side by side).
_FREE_CALLS = ("ConcatBitcast",)
_COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")

# The step's pieces, in the order a table lists them: (name, the op_name scope that marks it).
PIECES = (
    ("augmentation, two views", "/augment/"),
    ("online encoder forward", "jvp(online)"),
    ("predictor", "predictor"),
    ("target forward", "target"),
    ("objective", "objective"),
    ("optimiser update", "/optimizer/"),
    ("gradient and update norms", "/norms/"),
    ("online probe", "/probe/"),
    ("EMA update", "/ema_update/"),
    ("non-finite guard", "/guard/"),
    ("metrics", "/metrics/"),
)
BACKWARD = "online encoder backward"
TARGET_BACKWARD = "target backward"
COLLECTIVES = "collectives (gradient all-reduce, ...)"
UNNAMED = "copies and layout changes (unnamed)"
REST = "rest"


def array_bytes(text: str, hbm_only: bool = False) -> int:
  """Bytes of every array in an HLO type (a tuple's elements summed), as laid out in tiles;
  ``hbm_only``: only those in the device's main memory (a TPU's layouts mark the others,
  on-chip memories, with ``S(n)``)."""
  total = 0
  for dtype, dims, layout in _ARRAY.findall(text):
    if hbm_only and re.search(r"S\(\d+\)", layout or ""):
      continue
    shape = [int(d) for d in dims.split(",") if d]
    m = re.match(r"\{([0-9,]*)(?::T\(([0-9,]+)\))?", layout or "")
    if m and m.group(2) and shape:
      minor_to_major = [int(x) for x in m.group(1).split(",") if x]
      for axis, tile in zip(minor_to_major, reversed([int(x) for x in m.group(2).split(",")])):
        shape[axis] = -(-shape[axis] // tile) * tile
    n = 1
    for d in shape:
      n *= d
    total += n * _ELEMENT_BYTES[dtype]
  return total


def _computations(hlo: str) -> tuple[dict[str, list[tuple]], str]:
  computations, current, entry = {}, None, ""
  for line in hlo.splitlines():
    if line.startswith("%") or line.startswith("ENTRY"):
      name = re.match(r"(?:ENTRY )?%([\w.\-]+)", line).group(1)
      current = computations.setdefault(name, [])
      entry = name if line.startswith("ENTRY") else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (m := _INSTRUCTION.match(line)):
      current.append((*m.groups(), line))
  return computations, entry


def piece_of(op_name: str, opcode: str) -> str:
  """The piece of the step an instruction belongs to, from its op_name."""
  if opcode.startswith(_COLLECTIVES):
    return COLLECTIVES
  if not op_name:
    return UNNAMED
  if "transpose(jvp(online))" in op_name:
    return BACKWARD
  if "transpose(jvp(target))" in op_name:  # a target trained by gradients (SDMI's alternating or joint updates)
    return TARGET_BACKWARD
  for piece, scope in PIECES:
    if scope in op_name:
      return piece
  return REST


def _tuple_elements(text: str) -> list[str]:
  """The top-level elements of an HLO tuple type ``(a, (b, c), d)``."""
  text = text.strip()
  if not text.startswith("("):
    return [text]
  elements, depth, start = [], 0, 1
  for k, ch in enumerate(text):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        elements.append(text[start:k])
        break
    elif ch == "," and depth == 1:
      elements.append(text[start:k])
      start = k + 1
  return [e.strip() for e in elements if e.strip()]


def instruction_bytes(result: str, opcode: str, operands: list[str], hbm_only: bool = False,
                      fused: list[tuple] | None = None) -> int:
  """What one instruction reads and writes: its operands and its result.

  An asynchronous copy or slice between memories (``copy-start``, ``slice-start``; their
  ``-done`` adds nothing) moves its destination's bytes: read from one memory, written to
  the other (``hbm_only``: the side in main memory). A fusion (``fused``: its computation's
  instructions) reads only the slices of an operand it only slices (a scanned layer's
  weights out of the stack), and writes only the update of a result it updates in place."""
  if opcode in ("copy-start", "slice-start"):
    # copy-start: (destination, source, context); slice-start: ((operands), destination, context)
    elements = _tuple_elements(result)
    if len(elements) < 2:
      return 0
    destination, source = (elements[0], elements[1]) if opcode == "copy-start" else (elements[1], operands[0] if operands else "")
    size = array_bytes(destination)
    if not hbm_only:
      return 2 * size
    return size * sum(1 for t in (destination, source) if t and array_bytes(t, hbm_only=True))
  if opcode in ("dynamic-slice", "slice"):
    return 2 * array_bytes(result, hbm_only)
  if opcode == "dynamic-update-slice":
    return 2 * array_bytes(operands[1] if len(operands) > 1 else "", hbm_only)
  reads = [array_bytes(t, hbm_only) for t in operands]
  writes = array_bytes(result, hbm_only)
  if opcode == "fusion" and fused:
    types = {name: typ for name, typ, *_ in fused}
    params = {int(m.group(1)): name for name, _, op, args, _ in fused if op == "parameter"
              for m in [re.match(r"\s*(\d+)", args)] if m}
    users = collections.defaultdict(list)
    for name, typ, op, args, _ in fused:
      for position, o in enumerate(re.findall(r"%([\w.\-]+)", args)):
        users[o].append((op, position, typ, args))
    root = next((row for row in fused if "ROOT " in row[4]), None)
    in_place = root is not None and root[2] == "dynamic-update-slice"
    for index, name in params.items():
      uses = users.get(name, [])
      if index >= len(reads) or not uses:
        continue
      if all(op in ("dynamic-slice", "slice", "gather") and position == 0 for op, position, _, _ in uses):
        # (several slices may overlap, e.g. a blur's shifted windows: at most the whole)
        reads[index] = min(reads[index], sum(array_bytes(typ, hbm_only) for _, _, typ, _ in uses))
      elif in_place and all(op == "dynamic-update-slice" and position == 0 for op, position, _, _ in uses):
        reads[index] = 0  # the buffer updated in place: only the update is written
    if in_place:
      update = re.findall(r"%([\w.\-]+)", root[3])[1:2]
      writes = array_bytes(types.get(update[0], ""), hbm_only) if update else writes
  return writes + sum(reads)


def trip_count(while_line: str, condition: list[tuple]) -> int:
  """A counted loop's trips: the compiler's ``known_trip_count`` where it gives one, else
  read off its condition (``i < N`` from 0, as a fori_loop compiles); 1 where neither."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known.group(1))
  constants = [int(c) for *_, line in condition for c in re.findall(r"\bs32\[\]\S* constant\((\d+)\)", line)]
  compares = [line for *_, line in condition if "direction=LT" in line or "compare" in line]
  return constants[0] if len(constants) == 1 and len(compares) == 1 else 1


def bytes_by_piece(hlo: str) -> tuple[collections.Counter, collections.Counter]:
  """({piece: bytes}, {piece: bytes in main memory}) of a compiled program's text: every instruction the entry computation
  runs, and those of the loops and branches it calls: a counted loop's body once per trip
  (``trip_count``; XLA's cost analysis counts it once), of a conditional's branches the
  one that moves the most (SDMI's alternating step runs one of two whole steps)."""
  computations, entry = _computations(hlo)
  types = {name: typ for body in computations.values() for name, typ, *_ in body}

  def fused_of(line: str) -> list[tuple] | None:
    called = re.search(r"\bcalls=%([\w.\-]+)", line)
    return computations.get(called.group(1)) if called else None

  def own_bytes(name: str) -> int:
    return sum(instruction_bytes(typ, opcode, [types.get(o, "") for o in re.findall(r"%([\w.\-]+)", operands)],
                                 fused=fused_of(line) if opcode == "fusion" else None)
               for _, typ, opcode, operands, line in computations.get(name, []) if opcode not in _FREE)

  trips, todo = {}, [(entry, 1)]
  while todo:
    name, times = todo.pop()
    if name in trips or name not in computations:
      continue
    trips[name] = times
    for _, _, opcode, _, line in computations[name]:
      if opcode == "while":
        condition = re.search(r"\bcondition=%([\w.\-]+)", line).group(1)
        body_times = times * trip_count(line, computations.get(condition, []))
        todo += [(condition, body_times), (re.search(r"\bbody=%([\w.\-]+)", line).group(1), body_times)]
      elif opcode == "conditional":
        branches = re.findall(r"\b(?:true_computation|false_computation)=%([\w.\-]+)", line)
        branches += [b.strip(" %") for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
                     for b in group.split(",")]
        if branches:
          todo.append((max(branches, key=own_bytes), times))
      elif opcode == "call":
        todo += [(c, times) for c in re.findall(r"\bto_apply=%([\w.\-]+)", line)]
  # An instruction without an op_name (a copy, a prefetch into on-chip memory that the
  # compiler added) belongs to the piece of the first named instruction that uses it.
  named, users = {}, collections.defaultdict(list)
  for body in computations.values():
    for name, _, opcode, operands, line in body:
      op_name = re.search(r'op_name="([^"]*)"', line)
      if op_name:
        named[name] = piece_of(op_name.group(1), opcode)
      for o in re.findall(r"%([\w.\-]+)", operands):
        users[o].append(name)

  def owner(name: str) -> str:
    seen, frontier = {name}, [name]
    while frontier:
      nxt = []
      for n in frontier:
        if n in named:
          return named[n]
        nxt += [u for u in users.get(n, ()) if u not in seen]
        seen.update(nxt)
      frontier = nxt
    return UNNAMED

  pieces = {False: collections.Counter(), True: collections.Counter()}
  for name, times in trips.items():
    for instruction, typ, opcode, operands, line in computations[name]:
      if (opcode in _FREE or opcode in _CONTROL_FLOW or opcode.endswith("-done")
          or (opcode == "custom-call" and any(f'"{c}"' in line for c in _FREE_CALLS))):
        continue
      piece = COLLECTIVES if opcode.startswith(_COLLECTIVES) else named.get(instruction) or owner(instruction)
      operand_types = [types.get(o, "") for o in re.findall(r"%([\w.\-]+)", operands)]
      for hbm_only in (False, True):
        pieces[hbm_only][piece] += instruction_bytes(
            typ, opcode, operand_types, hbm_only, fused_of(line) if opcode == "fusion" else None) * times
  return pieces[False], pieces[True]


def ordered(pieces: collections.Counter) -> list[tuple[str, int]]:
  """The pieces in the table's order, those with no bytes left out."""
  names = [p for p, _ in PIECES[:2]] + [BACKWARD] + [p for p, _ in PIECES[2:4]] + [TARGET_BACKWARD]
  names += [p for p, _ in PIECES[4:]]
  names += [COLLECTIVES, UNNAMED, REST]
  return [(n, pieces[n]) for n in names if pieces.get(n)]
