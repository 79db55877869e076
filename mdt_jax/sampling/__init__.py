"""mdt_jax.sampling"""
