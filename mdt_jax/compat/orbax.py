"""orbax-checkpoint's private array-metadata store.

The jax.Array handler orbax registers by default is built with an ``array_metadata_store``
(each process's write shapes and PRNG key dtypes, in ``array_metadatas/`` of a checkpoint); the
checkpointer's own ArrayHandler (mdt_jax/training/checkpoints.py) is built the same way, so that
its checkpoints are what orbax's default handler writes. orbax exports no public name for the
store's class (orbax-checkpoint 0.12.8).
"""

from __future__ import annotations

from mdt_jax.compat import private_attr

PATH = 'orbax.checkpoint._src.metadata.array_metadata_store'

ArrayMetadataStore = private_attr(PATH, 'Store', 'orbax-checkpoint', '0.12.8', __name__)
