"""The ``README.md`` of each export format: how to load it, and the Hub's model card.

Each function returns the text for an export directory at ``path`` (named in the
commands it shows). The PEFT and merged READMEs start with the YAML front matter from
which the Hugging Face Hub reads the library and the base model.
"""

from __future__ import annotations

from pathlib import Path

from jaxpost.export.upload import is_repo_id

_GENERATE = "jaxpost generate \"What is 7 + 5?\" --chat"

_PROMPT_FORMAT = ("The tokenizer files carry the prompt format the run trained with: BOS is "
                  "added, and `tokenizer_config.json`'s chat template puts the run's system prompt "
                  "(unless the conversation starts with its own) where jaxpost did.\n\n")


def lora_readme(path: Path) -> str:
    """jaxpost's own LoRA export: the CLI command and Python lines that load it."""
    return (
        "# jaxpost LoRA export\n\n"
        "Command line:\n\n"
        f"    {_GENERATE} --lora {path}\n\n"
        "Python:\n\n"
        "    from jaxpost.export import load_lora_export\n"
        "    from jaxpost.models.loading import load_model\n"
        "    from jaxpost.sampling import generate\n"
        f"    loaded = load_model(<the config's model>)\n"
        f"    model = load_lora_export(\"{path}\", loaded)\n"
        "    print(generate(loaded, \"What is 7 + 5?\", model=model, chat=True))\n")


def _card_metadata(**fields: str) -> str:
    """A model card's YAML front matter (the Hub reads library and base model from it)."""
    lines = [f"{k}: {v}" for k, v in fields.items() if v]
    return "---\n" + "\n".join(lines) + "\n---\n\n"


def _packages(extra: str = "") -> str:
    return (f"Packages: `pip install torch transformers{extra}` (and `sentencepiece protobuf` "
            "where this directory has no `tokenizer.json`).\n\n")


def _generate_snippet(model_var: str = "model") -> str:
    """Python lines that answer one question with the run's chat template, greedily."""
    return (
        '    messages = [{"role": "user", "content": "What is 7 + 5?"}]\n'
        "    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n"
        '                                           return_dict=True, return_tensors="pt")\n'
        f"    out = {model_var}.generate(**inputs, max_new_tokens=128, do_sample=False)\n"
        '    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], '
        "skip_special_tokens=True))\n\n")


def peft_readme(path: Path, base: str, *, embedded_base: bool = False) -> str:
    """PEFT adapters for the base model ``base`` (a Hub id or a local path).

    ``embedded_base``: the run trained jaxpost's embedded model, a quantisation of
    ``base``, whose dequantized weights the README loads instead.
    """
    if embedded_base:
        load_base = (
            "    # jaxpost's embedded model is a Q4_K_M quantisation of google/gemma-3-270m: its\n"
            "    # dequantized weights (a Hugging Face directory in jaxpost's cache) give\n"
            f"    # jaxpost's numbers; \"{base}\" itself gives close but not identical ones.\n"
            "    from jaxpost.models.loading import embedded_model_dir\n"
            "    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), "
            "dtype=torch.float32)\n")
    else:
        load_base = (f"    base = AutoModelForCausalLM.from_pretrained(\"{base}\", "
                     "dtype=torch.float32)\n")
    return (
        _card_metadata(library_name="peft", base_model=base if is_repo_id(base) else "",
                       pipeline_tag="text-generation")
        + "# jaxpost PEFT (LoRA) adapters\n\n"
        f"Adapters for `{base}` in Hugging Face PEFT format. " + _PROMPT_FORMAT
        + _packages(" peft")
        + "    import torch\n"
        "    from peft import PeftModel\n"
        "    from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"    tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
        + load_base
        + f"    model = PeftModel.from_pretrained(base, \"{path}\").eval()\n"
        + _generate_snippet()
        + "`model.merge_and_unload()` gives a plain transformers model. `config.yaml` is the "
        "training config, `metrics.json` its final metrics.\n")


def merged_readme(path: Path) -> str:
    """A merged Hugging Face model: transformers, jaxpost, and where GGUF comes from."""
    return (
        _card_metadata(library_name="transformers", pipeline_tag="text-generation")
        + "# jaxpost merged model (Hugging Face format)\n\n"
        "The LoRA adapters are merged into the base weights (float32). " + _PROMPT_FORMAT
        + "transformers. " + _packages()
        + "    import torch\n"
        "    from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"    tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n"
        f"    model = AutoModelForCausalLM.from_pretrained(\"{path}\", dtype=torch.float32)\n"
        + _generate_snippet()
        + "jaxpost (the run's system prompt included):\n\n"
        f"    {_GENERATE} --model {path}\n\n"
        "llama.cpp / Ollama: `jaxpost export RUN_DIR --format gguf` writes a GGUF file.\n")


def gguf_readme(path: Path, file_name: str, gguf_type: str) -> str:
    """A GGUF export: llama.cpp, Ollama (its Modelfile) and jaxpost."""
    return (
        f"# jaxpost GGUF export ({gguf_type})\n\n"
        "The trained LoRA adapters merged into the base model, for llama.cpp and Ollama. The "
        "file carries the run's prompt format as `tokenizer.chat_template` (with the run's "
        "system prompt unless the conversation starts with its own), which llama.cpp's "
        "chat mode applies.\n\n"
        "llama.cpp (a chat; the file's template formats each turn):\n\n"
        f"    llama-cli -m {path / file_name}\n\n"
        "llama-cpp-python: `Llama(model_path=...).create_chat_completion(messages=[...])`.\n\n"
        "On CPUs with AMX, llama.cpp's repacking of q8_0 weights can crash (llama.cpp's own "
        "q8_0 files too): `--no-repack` (llama-cpp-python: the model parameter "
        "`use_extra_bufts = False`) avoids it.\n\n"
        "Ollama (the Modelfile holds the prompt format and the run's system prompt):\n\n"
        f"    cd {path} && ollama create my-model -f Modelfile && ollama run my-model\n\n"
        "jaxpost (the run's system prompt included):\n\n"
        f"    {_GENERATE} --model gguf:{path / file_name}\n")
