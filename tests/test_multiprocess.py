"""Two JAX processes on one machine, as on two hosts of a GPU cluster or a TPU slice:
each streams its own rows of every global batch, the step runs over both processes'
devices, only process 0 writes the work directory's files, the checkpoints (the state
once, the data iterator once per process) resume, and the training equals one process
with the same global batch (in the test's own process, on its 8 devices)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, free_port, tiny_config

from emim.metric_writer import read_metrics

OVERRIDES = {"data.source": "image_folder", "data.stream": True, "data.workers": 0, "data.decode_size": 16,
             "data.num_classes": 4, "train.batch_size": 16, "eval.mi_batch_size": 32, "eval.every_steps": 0}
ARGS = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]


def launch(workdir, folder, processes=2, stop_at_step=None):
  """The same command in ``processes`` processes of 4 / processes CPU devices each (4 in
  all); returns their logs."""
  port = free_port()
  devices = 4 // processes
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")}
  command = [sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal", f"--workdir={workdir}",
             f"--config.data.path={folder}", *ARGS]
  if processes > 1:
    command += ["--distributed", f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
  if stop_at_step:
    command.append(f"--stop_at_step={stop_at_step}")
  procs = [subprocess.Popen(command + ([f"--process_id={i}"] if processes > 1 else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for i in range(processes)]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


@pytest.mark.slow
def test_two_processes_train_stream_resume_write_once_and_equal_one_process(tmp_path, folder):
  launch(tmp_path / "two", folder, stop_at_step=2)
  step2 = tmp_path / "two" / "checkpoints" / "2"
  for i in range(2):  # each process saved where its own stream stands: 2 batches of 8 read
    assert json.loads((step2 / "data" / f"process_{i}-of-2.json").read_text())["next_index"] == 2
  logs = launch(tmp_path / "two", folder)
  for log in logs:
    assert "Resumed from step 2" in log and "with the data iterator's position" in log
  assert "Parameters:" in logs[0] and "Parameters:" not in logs[1]  # process 0 logs the overview

  # One writer: every line once, written by process 0 alone.
  rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert [r["step"] for r in rows if "eval/mi_infonce" in r] == [0, 2, 4]
  assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 2  # one event file per start, not per process
  assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["batch_size"] == 16

  # The same global batches in this one process (its 8 devices): the same training.
  from emim import train

  config = tiny_config("synthetic", "runlocal", **OVERRIDES, **{"data.path": str(folder)})
  train.run(config, str(tmp_path / "one"))
  one = {r["step"]: r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r}
  two = {r["step"]: r for r in rows if "loss" in r}
  assert sorted(one) == sorted(two) == [2, 4]
  for step in (2, 4):
    for name in ("loss", "grad_norm", "param_norm", "probe_loss"):
      np.testing.assert_allclose(two[step][name], one[step][name], rtol=2e-4, err_msg=f"{name} at step {step}")


@pytest.mark.slow
def test_a_busy_work_directory_stops_every_process_of_a_job_at_once(tmp_path, folder):
  """Process 0 finds the lock held; the other process learns it at once, not at a
  collective it would wait on."""
  from emim.workdir import WorkdirLock

  with WorkdirLock(tmp_path):
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2")}
    command = [sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal",
               f"--workdir={tmp_path}", f"--config.data.path={folder}", *ARGS, "--distributed",
               f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(command + [f"--process_id={i}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env) for i in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [1, 1], logs
  assert f"is in use by another job: pid {os.getpid()}" in logs[0]
  assert "Process 0 of this job could not take the work directory's lock" in logs[1]
