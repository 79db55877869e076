"""Performance tools on top of the package: the benchmark and compute-setting parity of
``tools/bench.py`` (`benchmark`, `parity`), TPU slices and compile-only reports (`aot`, `tpu`,
`hlo`, `traffic`) and profile summaries (`profile`)."""
