"""The libtpu a process compiles with, and the versions known to crash on emim's programs.

libtpu holds XLA's TPU compiler. A crash inside it kills the process (a signal, after
minutes of compiling) instead of raising an error, so a run on a chip where the installed
libtpu is known to crash is told so, with the fix, before it starts compiling
(``emim.main``); ``python -m emim.aot`` names the libtpu in every table it prints.
"""

import importlib.metadata
import os
import pathlib

# (libtpu version prefix, device kind prefix) -> what was seen. Found by compiling emim's
# programs ahead of time for each slice (python -m emim.aot; BENCHMARKS.md, "Cloud
# TPU"): libtpu 0.0.42.1, the version jax 0.10.2's tpu extra pins, crashed with SIGSEGV (a
# stack overflow: MigrateInstructionUsers recursing until LloRegion::AppendInstruction
# overflows) 2.5 to 12 minutes into compiling the ResNet train steps (ResNet-18 and
# ResNet-50; the network's forward and backward alone too) for a v6e, where v4, v5e and
# v5p compile them; libtpu 0.0.52 compiles them for a v6e.
KNOWN_COMPILER_CRASHES = {
    ("0.0.42.", "TPU v6"): ("libtpu {version} crashes (SIGSEGV, minutes into compiling) on emim's ResNet-18 and "
                            "ResNet-50 train steps for this chip ({kind}); libtpu 0.0.52 compiles them: "
                            "pip install libtpu==0.0.52, or launch/tpu_vm.sh --libtpu=0.0.52 (pip warns that jax's "
                            "tpu extra pins 0.0.42.*; compiled ahead of time on a CPU, not yet run on a v6e chip). "
                            "See BENCHMARKS.md, \"Cloud TPU\"."),
}


def libtpu_in_use() -> tuple[str, str]:
  """(version, path) of the libtpu this process loaded (TPU_LIBRARY_PATH's or the
  installed package's); the version is "unknown" where no package metadata sits beside
  it, the path "" where none is loaded or installed."""
  path = ""
  try:
    with open("/proc/self/maps") as maps:
      path = next((line.split()[-1] for line in maps if line.rstrip().endswith("/libtpu.so")), "")
  except OSError:  # not Linux
    pass
  path = path or os.environ.get("TPU_LIBRARY_PATH", "")
  if path:  # a wheel's layout: site/libtpu/libtpu.so beside site/libtpu-X.dist-info
    versions = [d.version for d in importlib.metadata.distributions(path=[str(pathlib.Path(path).parent.parent)])
                if d.metadata["Name"] == "libtpu"]
    return (versions[0] if versions else "unknown"), path
  try:
    return importlib.metadata.version("libtpu"), ""
  except importlib.metadata.PackageNotFoundError:
    return "unknown", ""


def libtpu_advice(device_kind: str, version: str) -> str | None:
  """What is known to go wrong compiling emim's programs for ``device_kind`` (e.g.
  "TPU v6 lite") with libtpu ``version``, and the fix; None where nothing is."""
  for (version_prefix, kind_prefix), message in KNOWN_COMPILER_CRASHES.items():
    if version.startswith(version_prefix) and device_kind.startswith(kind_prefix):
      return message.format(version=version, kind=device_kind)
  return None
