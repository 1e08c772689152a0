"""TRL side of `grpo_step.py --compare-trl`: Hugging Face TRL's GRPOTrainer on CPU.

`grpo_step.py` writes the workload (the jaxpost config, the exact training rows in
jaxpost's order, jaxpost's prompt token ids, the LoRA target modules and the model
exported as a Hugging Face directory) and runs this script in a process of its own, so
that the peak RSS it reports is TRL's alone; this process imports torch and never
imports jax.

    python benchmarks/trl_grpo.py WORKLOAD.json RESULT.json

Writes RESULT.json: seconds of each step (TrainerCallback on_step_begin..on_step_end)
and of the rollout inside it (model.generate), peak RSS, trainable parameters, versions
and the settings TRL ran with.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets")
INSTALL_HINT = "pip install torch transformers peft trl"


def missing_packages() -> list[str]:
    """Names in PACKAGES that cannot be imported (checked without importing them)."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def peak_rss_gb() -> float:
    """This process's peak resident set size, in the unit grpo_step.py reports (KiB / 1e6).

    Read from VmHWM, the high-water mark of this process's own memory map. ru_maxrss
    would not do: Linux carries it over from the parent through fork and exec, so a child
    of a 6.8 GB benchmark process reports at least 6.8 GB whatever it uses.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status: the TRL comparison needs Linux")


def trl_reward_functions(reward_fns: list, columns: list[str]) -> list:
    """jaxpost reward callables with TRL's reward signature.

    TRL calls ``f(prompts=, completions=, completion_ids=, trainer_state=, log_extra=,
    log_metric=, **dataset_columns)``; the wrapper passes on only ``prompts``,
    ``completions`` and the dataset ``columns`` (each a list aligned with the
    completions), which is what Tunix gives the same functions in jaxpost. Each keeps
    its registry ``__name__``, which TRL uses as the metric name.
    """
    wrapped = []
    for fn in reward_fns:
        def reward(prompts, completions, _fn=fn, **kwargs):
            given = {k: kwargs[k] for k in columns if k in kwargs}
            return _fn(prompts=prompts, completions=completions, **given)

        wrapped.append(functools.update_wrapper(reward, fn))
    return wrapped


def check_prompt_ids(tokenizer, prompts: list[str], expected: list[list[int]]) -> None:
    """Refuses to run when transformers tokenizes a prompt differently from jaxpost.

    TRL tokenizes plain-text prompts with ``processing_class(text=prompts)``; the same
    call here must give jaxpost's ids (BOS included), else the two sides would not see
    the same inputs.
    """
    got = tokenizer(text=prompts)["input_ids"]
    for prompt, ids, want in zip(prompts, got, expected):
        if list(ids) != list(want):
            raise SystemExit(
                f"transformers tokenizes prompt {prompt[:60]!r}... as {list(ids)[:12]}... "
                f"({len(ids)} ids) but jaxpost as {list(want)[:12]}... ({len(want)} ids); "
                "the exported tokenizer does not match jaxpost's")


def time_generate(model) -> list[tuple[float, int]]:
    """Times every ``model.generate`` call from now on: (seconds, decode steps) per call.

    GRPOTrainer samples each step's completions with ``generate`` on the (PEFT) model
    it trains, so this measures the rollout inside each step, under the same conditions
    as the step itself. transformers stops once every sequence has ended, so the decode
    steps can be fewer than max_completion_length.
    """
    calls: list[tuple[float, int]] = []
    inner = model.generate

    def generate(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        calls.append((time.perf_counter() - start,
                      int(out.shape[1] - kwargs["input_ids"].shape[1])))
        return out

    model.generate = generate
    return calls


def run(workload: dict[str, Any]) -> dict[str, Any]:
    """Trains ``workload["steps"]`` GRPO steps with TRL and returns the measurements."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from jaxpost.config import from_dict
    from jaxpost.rewards.registry import create_reward_functions

    class StepTimer(transformers.TrainerCallback):
        """Wall time of each optimizer step, rollout included, and TRL's logs."""

        def __init__(self):
            self.seconds: list[float] = []
            self.logs: list[dict] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    config = from_dict(workload["config"])
    rows = workload["rows"]
    columns = [k for k in rows[0] if k != "prompts"]
    # TRL reads the prompt from "prompt"; jaxpost's other columns go to the rewards.
    dataset = datasets.Dataset.from_list(
        [{**{k: row[k] for k in columns}, "prompt": row["prompts"]} for row in rows])
    hf_dir = workload["hf_dir"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    check_prompt_ids(tokenizer, [row["prompts"] for row in rows], workload["prompt_ids"])

    g = config.num_generations
    settings = dict(
        per_device_train_batch_size=config.batch_size * g,  # completions per step
        gradient_accumulation_steps=1,
        num_generations=g,
        num_iterations=config.num_iterations,
        max_completion_length=config.max_new_tokens,
        # Every prompt fits in max_prompt_length (jaxpost checks), so this left-pads
        # prompts to exactly max_prompt_length, as jaxpost's rollout does.
        pad_to_multiple_of=config.max_prompt_length,
        temperature=config.temperature,
        top_k=config.top_k if config.top_k is not None else 0,
        top_p=config.top_p if config.top_p is not None else 1.0,
        beta=config.beta,
        epsilon=config.epsilon,
        loss_type="grpo",  # Tunix's default loss_agg_mode, sequence-mean-token-mean
        scale_rewards="group",  # advantages (r - group mean) / group std, as Tunix
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.b1,
        adam_beta2=config.b2,
        optim="adamw_torch",
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        max_steps=workload["steps"],
        seed=config.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # jaxpost does not rematerialise either
        disable_dropout=True,
        shuffle_dataset=False,  # the rows are already in jaxpost's batch order
        remove_unused_columns=False,
        model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0,
        logging_steps=1,
        log_completions=False,
        disable_tqdm=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        output_dir=workload["output_dir"],
    )
    args = trl.GRPOConfig(**settings)
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                           target_modules=workload["target_modules"], bias="none",
                           task_type="CAUSAL_LM")
    timer = StepTimer()
    rewards = trl_reward_functions(create_reward_functions(config), columns)
    trainer = trl.GRPOTrainer(model=hf_dir, reward_funcs=rewards, args=args,
                              train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora, callbacks=[timer])
    trainable, total = trainer.model.get_nb_trainable_parameters()

    rollouts = time_generate(trainer.model)
    trainer.train()
    if len(rollouts) != len(timer.seconds):
        raise SystemExit(f"expected one generate call per step, got {len(rollouts)} calls "
                         f"for {len(timer.seconds)} steps")

    def logged(key: str) -> list[float]:
        return [log[key] for log in timer.logs if key in log]

    return {
        "step_seconds": timer.seconds,
        "rollout_seconds": [seconds for seconds, _ in rollouts],
        "rollout_decode_steps": [steps for _, steps in rollouts],
        "completion_mean_length": logged("completions/mean_length"),
        "reward": logged("reward"),
        "peak_rss_gb": peak_rss_gb(),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": trainer.model.config._attn_implementation,
        "eos_token_ids": [int(i) for i in trainer.eos_token_ids],
        "jax_imported": "jax" in sys.modules,
        "versions": {name: sys.modules[name].__version__
                     for name in ("torch", "transformers", "peft", "trl")},
        "settings": {k: settings[k] for k in (
            "per_device_train_batch_size", "num_generations", "num_iterations",
            "max_completion_length", "pad_to_multiple_of", "temperature", "top_k", "top_p",
            "beta", "epsilon", "loss_type", "scale_rewards", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
            "max_grad_norm", "gradient_checkpointing")},
    }


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    missing = missing_packages()
    if missing:
        raise SystemExit(f"the TRL comparison needs {', '.join(missing)}: {INSTALL_HINT}")
    workload = json.loads(Path(sys.argv[1]).read_text())
    result = run(workload)
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
