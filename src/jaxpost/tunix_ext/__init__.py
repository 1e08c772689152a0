"""jaxpost's extensions of Tunix: the places where it replaces or reaches into Tunix's
(and qwix's) code, one module per concern.

* :mod:`~jaxpost.tunix_ext.gemma3`: Tunix's Gemma 3 computing only the logits it uses.
* :mod:`~jaxpost.tunix_ext.logps`: chunked per-token log-probabilities and their gradient.
* :mod:`~jaxpost.tunix_ext.decoding`, :mod:`~jaxpost.tunix_ext.decoding_layers`: the CPU
  decoding loop with its weights laid out in advance, and the layers it runs.
* :mod:`~jaxpost.tunix_ext.sampler`: the hooks installed on Tunix's ``Sampler``.
* :mod:`~jaxpost.tunix_ext.losses`: the GRPO, PPO and DPO losses used in place of Tunix's.
* :mod:`~jaxpost.tunix_ext.cluster`: the RL cluster, with its replaced methods.
* :mod:`~jaxpost.tunix_ext.train_step`: the LoRA-only train step.
* :mod:`~jaxpost.tunix_ext.learners`, :mod:`~jaxpost.tunix_ext.trainers`: Tunix's RL
  learners, and its SFT and DPO trainers, as jaxpost builds them.
* :mod:`~jaxpost.tunix_ext.checkpointing`: where those trainers write a run's checkpoints.
* :mod:`~jaxpost.tunix_ext.versions`: the Tunix and qwix versions all of this was
  written for, checked where it is installed
  (:func:`~jaxpost.tunix_ext.versions.check_versions`).

Each place is listed in ``docs/tunix_patches.md`` with what it replaces, where it is
active, why, and the test that checks it.
"""
