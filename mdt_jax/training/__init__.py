"""mdt_jax.training"""
