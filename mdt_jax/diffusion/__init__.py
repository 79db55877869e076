"""mdt_jax.diffusion"""
