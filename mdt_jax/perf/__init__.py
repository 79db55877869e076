"""Performance tools on top of the package: TPU slices and compile-only reports (`aot`, `tpu`,
`hlo`, `traffic`) and profile summaries (`profile`)."""
