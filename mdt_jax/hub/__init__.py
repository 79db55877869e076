"""mdt_jax.hub"""
