"""Command-line pieces shared by the entry points (mdt_jax.sample, mdt_jax.inpaint, ...)."""
