"""mdt_jax.data"""
