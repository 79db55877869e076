"""mdt_jax.vae"""
