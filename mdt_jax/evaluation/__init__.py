"""mdt_jax.evaluation"""
