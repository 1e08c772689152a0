# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaxpost: teach a model to show its work, on Colab or Kaggle
#
# GRPO post-training on [Tunix](https://github.com/google/tunix) with LoRA: the model learns to answer as `<reasoning>...</reasoning><answer>...</answer>`. Every code cell is one call into the `jaxpost` package, where the logic lives and is tested; run the cells top to bottom.
#
# Runtime: a TPU (Colab: *Runtime > Change runtime type > TPU v2-8* or *v5e-1*; Kaggle: *Settings > Accelerator > TPU v5e-8*), a GPU, or the CPU.

# %% [markdown]
# ## 1. Install
#
# jaxpost with its pinned JAX and Tunix. Use the `tpu` extra on a TPU runtime and `cuda12` on a GPU; plain `jaxpost` on a CPU. The cell carries the tag `install`, which the tests skip.

# %% tags=["install"]
# %pip install -q "jaxpost[tpu]"

# %% [markdown]
# ## 2. Settings
#
# `PRESET = "auto"` picks the preset sized for this runtime's accelerator (`colab_tpu`, `colab_tpu_v5e1`, `kaggle_tpu`, `gpu`, `cpu`; see the README); name one to choose it yourself, or `smoke` for a tiny test run. An empty string keeps the preset's value. Each setting can also come from an environment variable, which is how the tests run this notebook.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("JAXPOST_PRESET", "auto")
OUTPUT_DIR = os.environ.get("JAXPOST_OUTPUT_DIR", "")
MAX_STEPS = os.environ.get("JAXPOST_MAX_STEPS", "")
SAVE_TO_DRIVE = os.environ.get("JAXPOST_SAVE_TO_DRIVE", "")
TEST_QUESTION = "A baker makes 23 muffins and sells 8. How many are left?"

# %% [markdown]
# ## 3. Credentials
#
# The TPU and GPU presets train Gemma 3 1B from Kaggle Models, which is gated: accept its terms at kaggle.com/models/google/gemma-3, then add the secrets `KAGGLE_USERNAME` and `KAGGLE_KEY` (and `HF_TOKEN` for a gated Hugging Face model). **Colab:** the key icon in the left sidebar, with *Notebook access* on. **Kaggle:** *Add-ons > Secrets*. jaxpost looks for each secret in values passed to `resolve_credentials(...)`, then Colab's secrets, then Kaggle's, then environment variables, and only ever shows whether it is set.

# %%
from jaxpost.colab_pipeline import (detect_platform, export_checkpoint, held_out_comparison,
                                    make_config,
                                    prepare_colab_session, quick_test,
                                    resolve_credentials, run_full_pipeline,
                                    show_training_curves, train_grpo, train_sft)

credentials = resolve_credentials()
credentials

# %% [markdown]
# ## 4. Accelerator and configuration
#
# Detects the TPU, GPU or CPU and builds the run's configuration. With `save_to_drive` on Colab, Google Drive is mounted (it asks for access once) and the output directory goes there, so a fresh runtime that reruns this notebook resumes from the last checkpoint instead of starting over.

# %%
accelerator = detect_platform()
config = make_config(PRESET, accelerator, output_dir=OUTPUT_DIR, max_steps=MAX_STEPS,
                     save_to_drive=SAVE_TO_DRIVE)
print(accelerator)

# %% [markdown]
# ## 5. Train, export and test in one call
#
# Prints the configuration, loads the model (one summary line: platform, devices, mesh, model, parameter and LoRA parameter counts), runs the SFT warm-up when the preset has one (`sft_steps`), trains with GRPO while checkpointing, exports the LoRA adapters answers a held-out question, and prints a base-vs-trained table on held-out examples.

# %%
session, state, export_path = run_full_pipeline(config, credentials=credentials)

# %% [markdown]
# ## 6. Results
#
# Reward, KL to the reference model, loss and completion length by step, read from `metrics.jsonl` in the output directory; then the trained model's answer to `TEST_QUESTION`, and where the adapters went with how to load them.

# %%
show_training_curves(config.output_dir)

# %%
answer = quick_test(config, session, TEST_QUESTION, trainer_state=state)

# %%
print((export_path / "README.md").read_text())

# %% [markdown]
# ### Base vs trained, on held-out questions
#
# The base model and the trained adapters (the run's newest checkpoint) answer the same 16 held-out questions with the same prompts, greedily, reusing the loaded model: GSM8K's test split for a GSM8K run, else the run's task drawn with another seed. The table gives accuracy, format rate, partial credit, pass@1 and completion length side by side; read format rate and accuracy together (format up with accuracy down is reward hacking). `jaxpost eval --compare` does the same from the command line.

# %%
comparison = held_out_comparison(config, session, num_examples=16)

# %% [markdown]
# ## 7. The same run, step by step
#
# For looking between stages. The first run's model is released to free its memory. With the same output directory `train_sft` and `train_grpo` resume from that run's newest checkpoints (already at their last steps, so they only load them); raise `MAX_STEPS` to train on.

# %%
del session, state
session = prepare_colab_session(config, credentials=credentials)

# %%
sft_state = train_sft(config, session)  # None without a warm-up (sft_steps=0)
state = train_grpo(config, session)
state.history[-1]

# %%
export_path = export_checkpoint(config, state)
answer = quick_test(config, session, TEST_QUESTION, trainer_state=state)
