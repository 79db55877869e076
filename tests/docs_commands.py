"""The `python -m mdt_jax.X` and `python tools/X.py` commands printed in Markdown pages, and a
check of their flags by each program's own parser, without running the program.

`commands(text)` finds the commands (continued lines joined; `...`, shell variables and the `[`,
`]` of optional parts dropped). Run as a script (`python tests/docs_commands.py` with a JSON list of [program, args]
on stdin) it parses each command's arguments with the program's parser and prints a JSON list of
[program, args, error] for those refused: an unknown flag, a bad value, a config override naming
no field. A required flag the page leaves out is not an error (pages show parts of commands);
config files written as placeholders (`--config=CONFIG`) are read as the quickstart's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = r'python (?:-m (mdt_jax(?:\.\w+)+)|(tools/[\w/]+\.py))'
_END = re.compile(r'[`|"]|&&|;|$', re.M)  # a command ends at a backtick, table bar, quote, ...
_REQUIRED = re.compile(r'must have a value other than None|the following arguments are required')


def commands(text: str) -> list[tuple[str, list[str]]]:
  """(program, args) of every command in a page: `mdt_jax.sample` or `tools/bench.py`."""
  text = re.sub(r'\\\n\s*', ' ', text)  # continued lines
  out = []
  for m in re.finditer(PROGRAM, text):
    rest = text[m.end() :]
    args = rest[: _END.search(rest).start()]
    tokens = shlex.split(args.replace('[', ' ').replace(']', ' '), comments=True)
    keep = [t for t in tokens if t != '...' and '$' not in t]  # shell variables: no value here
    out.append((m.group(1) or m.group(2), keep))
  return out


class _Parsed(Exception):
  pass


def _argparse_check(run, args: list[str]) -> None:
  """Parses with the program's argparse parser (required arguments made optional), then stops."""
  original = argparse.ArgumentParser.parse_args

  def parse(self, argv=None, namespace=None):
    for action in self._actions:
      action.required = False
    original(self, argv, namespace)
    raise _Parsed()

  argparse.ArgumentParser.parse_args = parse
  try:
    run(args)
  except _Parsed:
    pass
  except SystemExit as e:
    raise ValueError(f'argparse refused the arguments (exit {e.code})') from None
  finally:
    argparse.ArgumentParser.parse_args = original


def _load(program: str) -> dict:
  """The program's module namespace, imported or run as a file, not as __main__."""
  if program.startswith('tools/'):
    sys.path[:0] = [ROOT, os.path.join(ROOT, 'tools')]
    return runpy.run_path(os.path.join(ROOT, program), run_name='docs_commands_tool')
  import importlib

  return vars(importlib.import_module(program))


def _placeholder_configs(args: list[str]) -> list[str]:
  out = []
  for a in args:
    m = re.match(r'--config=(.*)', a)
    if m and not os.path.isfile(os.path.join(ROOT, m.group(1))):
      a = '--config=configs/quickstart.py'
    out.append(a)
  return out


def check(items: list[tuple[str, list[str]]]) -> list[tuple[str, list[str], str]]:
  """[program, args, error] of the commands their program's parser refuses."""
  from absl import app, flags  # noqa: F401 - app defines --helpfull etc.: kept between programs
  from absl import logging  # noqa: F401 - its flags (--verbosity, ...) are kept too

  base = set(flags.FLAGS)
  failures = []
  for program in dict.fromkeys(p for p, _ in items):
    for name in set(flags.FLAGS) - base:  # the previous program's flags
      delattr(flags.FLAGS, name)
    for mod in [m for m in sys.modules if m == program or m.startswith(('mdt_jax.cli', 'studies'))]:
      del sys.modules[mod]
    try:
      namespace = _load(program)
    except Exception as e:  # noqa: BLE001 - reported as the program's failure
      failures += [(p, a, f'cannot load: {e}') for p, a in items if p == program]
      continue
    own = set(flags.FLAGS)
    uses_absl = bool(own - base)
    for p, args in items:
      if p != program:
        continue
      args = [a for a in args if a not in ('--help', '--helpfull')]  # they print and exit
      try:
        if uses_absl:
          for name in set(flags.FLAGS) - own:  # the last command's config overrides
            delattr(flags.FLAGS, name)
          flags.FLAGS.unparse_flags()
          sys.argv = [program] + _placeholder_configs(args)  # config overrides are read there
          flags.FLAGS(sys.argv)
        else:
          _argparse_check(namespace['main'] if 'main' in namespace else None, args)
      except Exception as e:  # noqa: BLE001 - what the parser says
        message = f'{type(e).__name__}: {e}'
        if not _REQUIRED.search(message):
          failures.append((p, args, message))
  return failures


if __name__ == '__main__':
  os.chdir(ROOT)
  sys.path.insert(0, ROOT)
  print(json.dumps(check([tuple(i) for i in json.load(sys.stdin)])))
