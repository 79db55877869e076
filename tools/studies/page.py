"""The Markdown report page every study writes: title, introduction, the command that wrote it,
the figure, setup, results and the computed conclusion, then a hand-written discussion that a
rewrite keeps."""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

from mdt_jax import atomic

DISCUSSION_MARK = '<!-- discussion: text below this line is kept when the report is rewritten -->'


def fmt(x: float | None, digits: int = 3) -> str:
  """A number with `digits` significant digits; None and NaN are 'n/a'."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return 'n/a'
  return f'{x:.{digits}g}'


def existing_discussion(md_path: str) -> str:
  """The hand-written text after the discussion mark of an existing report, or ''."""
  if not os.path.isfile(md_path):
    return ''
  with open(md_path) as f:
    text = f.read()
  _, mark, rest = text.partition(DISCUSSION_MARK)
  return rest if mark else ''


def markdown(
    *,
    title: str,
    intro: str,
    command: str,
    figure: str,
    png_name: str,
    setup: Sequence[str],
    results: Sequence[str],
    conclusion: Sequence[str],
    discussion: str = '',
) -> str:
  lines = [
      f'# {title}',
      '',
      intro,
      '',
      f'Written by `{command}`; everything above the discussion is rewritten on each run.',
      '',
      f'![{figure}]({png_name})',
      '',
      '## Setup',
      '',
      *setup,
      '',
      '## Results',
      '',
      *results,
      '',
      '## Conclusion (computed from the numbers)',
      '',
      *[f'- {s}' for s in conclusion],
      '',
      DISCUSSION_MARK,
  ]
  text = '\n'.join(lines) + '\n'
  return text + (discussion.lstrip('\n') if discussion else '')


def write(
    out: str, plot: Callable[[str], str], markdown_of: Callable[[str, str], str]
) -> tuple[str, str]:
  """``out``.png by ``plot(path)`` and ``out``.md by ``markdown_of(png name, discussion)``,
  keeping the discussion of an existing .md; their paths."""
  png, md = out + '.png', out + '.md'
  plot(png)
  atomic.write_text(md, markdown_of(os.path.basename(png), existing_discussion(md)))
  return png, md


def report(
    results: dict,
    out: str,
    command: str,
    *,
    required: Sequence[str],
    title: str,
    intro: str,
    figure: str,
    plot: Callable[[dict, str], str],
    setup: Callable[[dict], Sequence[str]],
    tables: Callable[[dict], Sequence[str]],
    conclusion: Callable[[dict], Sequence[str]],
) -> tuple[str, str]:
  """A study's ``out``.png (``plot(results, path)``) and ``out``.md (the page of ``markdown``
  with the study's setup, tables and conclusion of ``results``), keeping the discussion of an
  existing .md; their paths. Results without every key of ``required`` are refused."""
  missing = [k for k in required if k not in results]
  if missing:
    raise ValueError(f'results have no {", ".join(missing)}: the study did not finish')

  def markdown_of(png_name: str, discussion: str) -> str:
    return markdown(
        title=title,
        intro=intro,
        command=command,
        figure=figure,
        png_name=png_name,
        setup=setup(results),
        results=tables(results),
        conclusion=conclusion(results),
        discussion=discussion,
    )

  return write(out, lambda png: plot(results, png), markdown_of)
