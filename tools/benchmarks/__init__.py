"""Performance tools on top of the package: the benchmark of ``tools/bench.py`` (analytic
`flops`, the `compiled` step's figures, `timing`, the eager `baselines`, the memory `fit` search,
report `tables`) and its compute-setting `parity`, TPU slices and compile-only reports (`aot`,
`tpu`, `hlo`, `traffic`) and profile summaries (`profile`)."""

import pathlib
import sys

# The PyTorch reference of the official model lives with the tests (tests/torch_reference); the
# torch baselines import it from there.
TESTS = pathlib.Path(__file__).resolve().parents[2] / 'tests'


def torch_reference_path() -> None:
  """Puts tests/ on sys.path so that `torch_reference` imports (it needs torch)."""
  if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))
