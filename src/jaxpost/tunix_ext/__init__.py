"""jaxpost's extensions of Tunix: every import of Tunix and qwix, and the places where it
replaces or reaches into their code, one module per concern. No module outside this
package imports either (``tests/test_imports.py`` checks it), so that an upgrade changes
this package only.

* :mod:`~jaxpost.tunix_ext.gemma3`: Tunix's Gemma 3 computing only the logits it uses.
* :mod:`~jaxpost.tunix_ext.logps`: chunked per-token log-probabilities and their gradient.
* :mod:`~jaxpost.tunix_ext.decoding`, :mod:`~jaxpost.tunix_ext.decoding_layers`: the CPU
  decoding loop with its weights laid out in advance, and the layers it runs.
* :mod:`~jaxpost.tunix_ext.sampler`: Tunix's ``Sampler`` with jaxpost's hooks installed,
  and its tokenizer adapter.
* :mod:`~jaxpost.tunix_ext.losses`: the GRPO, PPO and DPO losses used in place of Tunix's.
* :mod:`~jaxpost.tunix_ext.cluster`: the RL cluster, with its replaced methods.
* :mod:`~jaxpost.tunix_ext.train_step`: the LoRA-only train step.
* :mod:`~jaxpost.tunix_ext.learners`, :mod:`~jaxpost.tunix_ext.trainers`: Tunix's RL
  learners, and its SFT and DPO trainers, as jaxpost builds them.
* :mod:`~jaxpost.tunix_ext.checkpointing`: where those trainers write a run's checkpoints.
* :mod:`~jaxpost.tunix_ext.architectures`: Tunix's model families (``model`` and
  ``params`` modules), as jaxpost loads them.
* :mod:`~jaxpost.tunix_ext.safetensors`: Hugging Face Gemma 3 tensors in Tunix's names
  and layouts, one at a time.
* :mod:`~jaxpost.tunix_ext.rope`: the RoPE base of Tunix's Llama 3 and Qwen 3.
* :mod:`~jaxpost.tunix_ext.lora`: qwix's LoRA adapters, their products through a
  hand-written gradient.
* :mod:`~jaxpost.tunix_ext.versions`: the Tunix and qwix versions all of this was
  written for, checked where it is installed
  (:func:`~jaxpost.tunix_ext.versions.check_versions`).

Each place is listed in ``docs/tunix_patches.md`` with what it replaces, where it is
active, why, and the test that checks it.
"""
