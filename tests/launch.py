"""The training command line in a subprocess, optionally sending itself a signal at a step.

A kill or preemption test that signals the process from outside races the run (a timer, a
polled folder). Here the run signals itself from a `train_and_evaluate` step callback at the end
of a chosen step, so the interruption lands at the same point every time; the rest is the
command users run (`python -m mdt_jax.main`, its flags, multi-process setup and all).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_CONFIG = os.path.join(ROOT, 'tests', 'micro_config.py')

# argv: STEP SIGNAL_NAME, then mdt_jax.main's flags.
_SIGNAL_AT_STEP = r"""
import os, signal, sys
from absl import app
from mdt_jax import main
from mdt_jax.training import loop
step, sig = int(sys.argv.pop(1)), getattr(signal, sys.argv.pop(1))

def send(s, state):
  if s == step:
    os.kill(os.getpid(), sig)

train = loop.train_and_evaluate
loop.train_and_evaluate = lambda config, workdir: train(config, workdir, callbacks=[send])
app.run(main.main)
"""


def main_command(
    workdir: str, total_steps: int, *flags: str, signal_at: tuple[int, str] | None = None
) -> list[str]:
  """`python -m mdt_jax.main` on tests/micro_config.py; `signal_at=(step, 'SIGKILL')` makes the
  run send itself that signal after that step's update (before its checkpoint, if any)."""
  head = [sys.executable, '-m', 'mdt_jax.main']
  if signal_at is not None:
    head = [sys.executable, '-c', _SIGNAL_AT_STEP, str(signal_at[0]), signal_at[1]]
  return head + [
      f'--config={MICRO_CONFIG}',
      f'--workdir={workdir}',
      f'--config.total_steps={total_steps}',
      *flags,
  ]


def env(**extra: str) -> dict:
  """The environment of a launch: this checkout's mdt_jax, the session's caches (conftest)."""
  return dict(os.environ, PYTHONPATH=ROOT, **extra)


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
  """Run to the end; stdout and stderr together in .stdout."""
  return subprocess.run(
      cmd,
      env=kw.pop('env', env()),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      timeout=timeout,
      **kw,
  )


def free_port() -> int:
  """A free TCP port on loopback (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def one_line(output: str, logged_before: bool = False) -> str:
  """The one ``error: ...`` line of a command line's output (stderr, or stdout and stderr
  together: absl's log lines aside), checking that it is the only one and that no traceback was
  printed; ``logged_before``: tracebacks a library logged before the line (orbax's background
  thread, of a commit that failed) are let through, none after it."""
  lines = [line for line in output.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, output[-4000:]
  rest = output[output.index(lines[0]) :] if logged_before else output
  assert 'Traceback' not in rest, output[-4000:]
  return lines[0]


def run_user_error(cmd: list[str], **kw) -> str:
  """Run a command line that must stop on a user error: exit status 2 and one ``error:`` line
  (returned), no traceback."""
  out = run(cmd, **kw)
  assert out.returncode == 2, out.stdout[-4000:]
  return one_line(out.stdout)


def steps_saved(workdir: str) -> list[int]:
  """The committed checkpoints of a workdir (orbax writes into a temporary name, then renames)."""
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def run_main(module, *argv: str) -> None:
  """An absl entry point (mdt_jax.sample, mdt_jax.inpaint) in this process: its flags parsed
  from ``argv``, its main run, the flags reset afterwards (also when main raises)."""
  name = module.__name__.rsplit('.', 1)[-1]
  module.FLAGS([name, *argv])
  try:
    module.main([name])
  finally:
    module.FLAGS.unparse_flags()
