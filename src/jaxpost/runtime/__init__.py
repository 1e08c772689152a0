"""Where a run executes: the platform, the device mesh, memory, the download cache,
credentials, and atomic file writes.

* :mod:`~jaxpost.runtime.platform`: the accelerator, and the settings it calls for.
* :mod:`~jaxpost.runtime.mesh`: the ``fsdp x tp`` device mesh.
* :mod:`~jaxpost.runtime.memory`: peak memory, and malloc's arenas.
* :mod:`~jaxpost.runtime.cache`: where downloaded and converted models are kept.
* :mod:`~jaxpost.runtime.credentials`: Hugging Face and Kaggle tokens, never printed.
* :mod:`~jaxpost.runtime.atomic`: files written whole or not at all.
"""
