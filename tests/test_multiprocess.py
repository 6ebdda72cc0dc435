"""Two JAX processes on one machine, as on two hosts of a GPU cluster or a TPU slice:
each streams its own share of the data, the step runs over both processes' devices,
and the checkpoints (the state once, the data iterator once per process) resume."""

import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, folder, stop_at_step=None):
  """The same command in two processes of two CPU devices each; returns their logs."""
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2")}
  command = [
      sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal", f"--workdir={workdir}",
      "--config.data.source=image_folder", f"--config.data.path={folder}", "--config.data.stream=True",
      "--config.data.workers=0", "--config.data.decode_size=16", "--config.data.num_classes=4",
      "--config.train.batch_size=16", "--config.eval.mi_batch_size=32", "--config.eval.every_steps=0",
      "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  if stop_at_step:
    command.append(f"--stop_at_step={stop_at_step}")
  procs = [subprocess.Popen(command + [f"--process_id={i}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env) for i in range(2)]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def loss_lines(log):
  return [line.split("|")[-1].strip() for line in log.splitlines() if " step 4/4 " in line]


def test_two_processes_train_stream_and_resume(tmp_path, folder):
  launch(tmp_path, folder, stop_at_step=2)
  step2 = tmp_path / "checkpoints" / "2"
  for i in range(2):  # each process saved where its own stream stands: 2 batches of 8 read
    assert json.loads((step2 / "data" / f"process_{i}-of-2.json").read_text())["next_index"] == 2
  logs = launch(tmp_path, folder)
  for log in logs:
    assert "Resumed from step 2" in log and "with the data iterator's position" in log
  lines = [loss_lines(log) for log in logs]
  assert lines[0] and lines[0] == lines[1]  # one global step: both processes log the same loss
