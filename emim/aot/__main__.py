"""python -m emim.aot: see emim/aot/cli.py."""

from emim.aot import cli

if __name__ == "__main__":
  cli.main()
