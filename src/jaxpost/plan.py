"""The memory plan: what a run needs on each device, from its config's shapes alone.

:func:`memory_plan` reads the model's architecture (Tunix's ``ModelConfig`` for the
embedded, random and Kaggle Flax models, ``config.json`` for a local or Hugging Face
directory), never its weights, and estimates the bytes each device holds while the run
trains. ``jaxpost plan`` prints it (:meth:`MemoryPlan.table`).

What it counts, per device of an ``fsdp x tp`` mesh:

* Held for the whole run: the base weights, sharded by Tunix's Gemma 3 rules (other
  families are counted with the same layout); the reference model shares them
  (:mod:`jaxpost.models.lora`), so it costs nothing; the LoRA weights and AdamW's two moments,
  in the parameter dtype (optax keeps them in the parameters' dtype); on a CPU, the
  layer inputs a rollout keeps for the update after it (:func:`jaxpost.tunix_ext.sampler.keep_layer_inputs`).
* Each phase, on top of that; the peak is the largest phase:
  - rollout: the sampler's KV cache (counted whole on every device: Tunix creates it
    without a sharding) and the sampled position's logits;
  - GRPO update (``micro_batch_size`` or ``mini_batch_size`` or ``batch_size`` prompts
    x G rows of ``max_prompt_length + max_new_tokens`` tokens): the LoRA gradients, the
    layer activations the backward pass reads, and the chunked log-probs
    (:func:`jaxpost.tunix_ext.logps.completion_logps`); on a mesh with fsdp > 1, the
    gathered shards of the embedding;
  - critic update (PPO only): the critic's LoRA gradients and activations for the same
    rows (:mod:`jaxpost.models.critic`; its LoRA, value head and moments are held for the run);
  - SFT update (when ``sft_steps`` > 0): the same for ``sft_batch_size`` rows;
  - held-out evaluation (when ``final_eval_examples`` > 0): the KV cache of its
    batches of 8.

The shapes and byte counts are in :mod:`jaxpost.shapes`. The activation and log-prob
terms are fitted to what XLA's CPU compiler allocates for the chunked loss's gradient
(``memory_analysis()`` of 39 compiled steps of small random Gemma 3 models, float32 and
bfloat16, with and without remat, chunks of 64 to 256 rows): the estimates lie between
3% under and 17% over, except bfloat16 steps with remat, which they overestimate by 2%
to 75% (XLA's CPU compiler recomputes those in less memory). XLA on TPU and GPU keeps
bfloat16 products in bfloat16, so there they should overestimate more. Activations are
split over the mesh as Tunix's activation sharding says (rows over ``fsdp``, features
and heads over ``tp``). Sequences are counted at their budgets (``max_prompt_length``,
``max_new_tokens``). Not counted: a judge model other than the reference; on a CPU,
Python and the libraries are taken off the usable memory (:data:`CPU_RUNTIME_GIB`).
"""

from __future__ import annotations

import dataclasses
import math
import os

from jaxpost.config import ColabTrainingConfig
from jaxpost.runtime.platform import PLATFORM_DEVICES, PLATFORM_PRESETS
from jaxpost.shapes import (ModelShapes, kv_cache_bytes,  # noqa: F401  (re-exported)
                            layer_activation_bytes, logps_bytes, lora_specs, model_shapes,
                            packed_rows, shard_bytes, update_activation_bytes, weight_specs)
from jaxpost.tunix_ext.logps import logps_chunk_rows

GIB = 2**30
# Share of a device's memory left to XLA (compiled programs, scratch, fragmentation).
RESERVE = 0.10
# JAX preallocates this share of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
GPU_MEMORY_FRACTION = 0.75
# Resident memory of a process that has imported jaxpost's training modules and started
# JAX's CPU backend (0.38 GiB measured on Linux x86-64, jax 0.10, Tunix 0.1.7).
CPU_RUNTIME_GIB = 0.4
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_EVAL_BATCH = 8  # colab_pipeline.held_out_comparison's batches


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a plan: ``phase`` is ``"held"`` (the whole run) or the phase it belongs to."""

    phase: str
    label: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per device for one config on one platform (see the module docstring).

    Attributes:
      platform: a key of :data:`jaxpost.runtime.platform.PLATFORM_PRESETS`; kind: tpu, gpu or cpu.
      devices: devices on the platform; mesh: ``{"fsdp": n, "tp": m}``.
      memory_gib: memory per device (host RAM for a CPU); usable_gib: what the plan
        lets the run use, as ``usable_how`` says.
      rows: the estimates; the peak is the held rows plus the largest phase.
      shapes: the model's architecture; notes: lines describing the run.
    """

    config: ColabTrainingConfig
    platform: str
    kind: str
    devices: int
    mesh: dict
    memory_gib: float
    usable_gib: float
    usable_how: str
    rows: tuple[Row, ...]
    shapes: ModelShapes
    notes: tuple[str, ...] = ()

    @property
    def held_bytes(self) -> int:
        return sum(r.bytes for r in self.rows if r.phase == "held")

    @property
    def phases(self) -> dict[str, int]:
        """Bytes of each phase on top of the held rows, in the order they are listed."""
        out: dict[str, int] = {}
        for r in self.rows:
            if r.phase != "held":
                out[r.phase] = out.get(r.phase, 0) + r.bytes
        return out

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def peak_gib(self) -> float:
        return (self.held_bytes + self.phases[self.peak_phase]) / GIB

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.usable_gib

    def verdict(self) -> str:
        """``FITS (...)`` or ``DOES NOT FIT (...)`` with the peak and the usable memory."""
        share = f"{self.peak_gib:.2f} of {self.usable_gib:.2f} usable GiB"
        return f"FITS ({share})" if self.fits else f"DOES NOT FIT (needs {share})"

    def table(self) -> str:
        """The plan as a readable table in GiB per device, with what would make it fit."""
        c = self.config
        width = 52
        lines = [f"platform {self.platform}: {self.kind.upper()} x{self.devices}, "
                 f"{self.memory_gib:g} GiB each, mesh fsdp={self.mesh['fsdp']} "
                 f"x tp={self.mesh['tp']}", f"model {c.model} ({c.dtype})", *self.notes, "",
                 f"{'per device':<{width}}{'GiB':>7}"]
        for phase in ["held", *self.phases]:
            title = "held for the whole run" if phase == "held" else phase
            lines.append(title + (" (the peak)" if phase == self.peak_phase else ""))
            lines += [f"  {r.label:<{width - 2}}{r.bytes / GIB:>7.2f}" for r in self.rows
                      if r.phase == phase]
        lines += ["", f"{'peak: held + ' + self.peak_phase:<{width}}{self.peak_gib:>7.2f}",
                  f"{'usable: ' + self.usable_how:<{width}}{self.usable_gib:>7.2f}",
                  self.verdict()]
        if not self.fits:
            changes = fitting_changes(self)
            lines.append("to fit, any one of: " + "; ".join(changes) if changes else
                         "no single change of remat, micro_batch_size, max_new_tokens or "
                         "batch_size fits: use a smaller model or more devices")
        return "\n".join(lines)


def _gpu_fraction() -> float:
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))


def platform_for_preset(preset: str) -> str:
    """The platform a preset is sized for (:data:`PLATFORM_PRESETS`); ``"cpu"`` for others."""
    return next((name for name, (p, _) in PLATFORM_PRESETS.items() if p == preset), "cpu")


def memory_plan(config: ColabTrainingConfig, *, platform: str = "cpu",
                devices: int | None = None, memory_gib: float | None = None,
                shapes: ModelShapes | None = None) -> MemoryPlan:
    """Estimates the memory per device of training ``config`` on ``platform``.

    Args:
      platform: a key of :data:`PLATFORM_PRESETS`, for its kind, device count and memory.
      devices, memory_gib: plan for another device count or memory per device (GiB).
      shapes: the model's architecture (default: read from ``config.model`` by
        :func:`model_shapes`).

    Raises:
      ValueError: an unknown platform, or a mesh that needs more devices than there are.
    """
    if platform not in PLATFORM_PRESETS:
        raise ValueError(f"platform {platform!r} is unknown; known: {', '.join(PLATFORM_PRESETS)}")
    kind, default_devices = PLATFORM_DEVICES[platform]
    devices = devices or default_devices
    memory_gib = memory_gib or PLATFORM_PRESETS[platform][1]
    tp = config.mesh_tp
    fsdp = config.mesh_fsdp or max(devices // tp, 1)
    if fsdp * tp > devices:
        raise ValueError(f"mesh_fsdp={fsdp} x mesh_tp={tp} needs {fsdp * tp} devices, but "
                         f"the plan has {devices}; pass more devices or set the mesh")
    mesh = {"fsdp": fsdp, "tp": tp}
    s = shapes or model_shapes(config.model)
    b = _DTYPE_BYTES[config.dtype]
    chunked = s.family == "gemma3"
    # Tunix's other models have no jaxpost remat (their RematConfig stays NONE).
    remat = config.remat and chunked
    chunk = logps_chunk_rows(kind)
    per_tp = dataclasses.replace(s, embed_dim=-(-s.embed_dim // tp),
                                 hidden_dim=-(-s.hidden_dim // tp),
                                 num_heads=-(-s.num_heads // tp))
    weights = sum(shard_bytes(shape, spec, mesh, b) for _, shape, spec in weight_specs(s))
    lora = sum(shard_bytes(shape, spec, mesh, b) for _, shape, spec in
               lora_specs(s, config.lora_rank, config.lora_target_modules))
    # Tunix samples and trains micro_batch_size prompts at a time (else mini_batch_size,
    # else batch_size), each G times.
    rows = (config.micro_batch_size or config.mini_batch_size
            or config.batch_size) * config.num_generations
    prompt, completion = config.max_prompt_length, config.max_new_tokens
    tokens = prompt + completion
    # On a CPU, a rollout keeps every layer's input for the update that follows it with
    # the same rows and weights (one update per rollout, no mini or micro batches).
    keeps = (kind == "cpu" and chunked and config.num_iterations == 1
             and config.mini_batch_size in (None, config.batch_size)
             and config.micro_batch_size in (None, config.batch_size))
    out = [Row("held", "base weights (the reference model shares them)", weights),
           Row("held", f"LoRA weights (r={config.lora_rank})", lora),
           Row("held", "AdamW moments (2 x LoRA)", 2 * lora)]
    # PPO's critic (jaxpost.models.critic): the shared base, LoRA of its own and a value head.
    critic = lora + (s.embed_dim + 1) * 4
    if config.algorithm == "ppo":
        out += [Row("held", f"critic's LoRA (r={config.lora_rank}) and value head", critic),
                Row("held", "critic's AdamW moments", 2 * critic)]
    if keeps:
        out.append(Row("held", "rollout's layer inputs, kept for the update",
                       (s.num_layers + 1) * rows * tokens * s.embed_dim * b))

    def update(phase: str, n_rows: int, group: int) -> list[Row]:
        r, t = packed_rows(s, n_rows, prompt, completion, group) if chunked else (n_rows, tokens)
        how = "recomputed layer by layer (remat)" if remat else "every layer's (no remat)"
        logps = (f"log-probs, vocabulary in {chunk}-row chunks" if chunked
                 else "log-probs from all logits")
        found = [Row(phase, "LoRA gradients", lora),
                 Row(phase, f"activations, {how}",
                     update_activation_bytes(-(-r // fsdp), t, per_tp, b, remat)),
                 Row(phase, logps, logps_bytes(-(-n_rows // fsdp), completion, s, b, chunk,
                                               tp, kind, prompt))]
        if fsdp > 1:  # each tp shard of the embedding, gathered for the products
            found.append(Row(phase, "embedding gathered over fsdp",
                             shard_bytes((s.vocab_size, s.embed_dim), ("tp", None), mesh, b)))
        return found

    out.append(Row("rollout", f"KV cache ({rows} rows x {tokens} tokens)",
                   kv_cache_bytes(s, rows, tokens, b)))
    out.append(Row("rollout", "sampled position's logits", 2 * rows * s.vocab_size * 4))
    if not chunked:  # Tunix's prefill computes the logits of every prompt position
        out.append(Row("rollout", "prefill logits", rows * prompt * s.vocab_size * b))
    out += update("GRPO update", rows, config.num_generations)
    if config.algorithm == "ppo":  # the critic's update, after the policy's
        r, t = (packed_rows(s, rows, prompt, completion, config.num_generations) if chunked
                else (rows, tokens))
        out += [Row("critic update", "critic's LoRA gradients", critic),
                Row("critic update", "critic's activations",
                    update_activation_bytes(-(-r // fsdp), t, per_tp, b, remat))]
    if config.sft_steps:
        out += update("SFT update", config.sft_batch_size, 1)
    if config.final_eval_examples:
        n = min(_EVAL_BATCH, config.final_eval_examples)
        out.append(Row("held-out evaluation", f"KV cache and logits ({n} rows x {tokens} tokens)",
                       kv_cache_bytes(s, n, tokens, b) + 2 * n * s.vocab_size * 4))

    usable = memory_gib * (1 - RESERVE)
    how = f"{memory_gib:g} GiB less {RESERVE:.0%} for XLA"
    if kind == "gpu":
        usable *= _gpu_fraction()
        how = f"{_gpu_fraction():g} of {memory_gib:g} GiB (JAX), less {RESERVE:.0%}"
    elif kind == "cpu":
        usable -= CPU_RUNTIME_GIB
        how = f"{memory_gib:g} GiB less {RESERVE:.0%} and {CPU_RUNTIME_GIB:g} GiB for Python"
    params = sum(math.prod(shape) for _, shape, _ in weight_specs(s))
    prompts = rows // config.num_generations
    notes = (f"{s.family}: {s.num_layers} layers, {params / 1e9:.2f} B parameters; "
             f"LoRA r={config.lora_rank}",
             f"{config.algorithm.upper()}: {prompts} prompt{'s' * (prompts > 1)} x "
             f"G={config.num_generations} = "
             f"{rows} rows of {prompt} + {completion} tokens per rollout and update, "
             f"remat {'on' if remat else 'off'}")
    return MemoryPlan(config=config, platform=platform, kind=kind, devices=devices, mesh=mesh,
                      memory_gib=memory_gib, usable_gib=usable, usable_how=how,
                      rows=tuple(out), shapes=s, notes=notes)


def fitting_changes(plan: MemoryPlan) -> list[str]:
    """Single config changes under which ``plan``'s run fits, each as ``--set k=v (N GiB)``.

    Tried: remat on; fewer prompts per micro batch (the largest divisor that fits);
    a smaller ``max_new_tokens`` (the largest multiple of 64, at least 128, that fits);
    ``batch_size=1``.
    """
    c = plan.config
    prompts = c.micro_batch_size or c.mini_batch_size or c.batch_size
    outer = c.mini_batch_size or c.batch_size
    candidates = [{"remat": True}] if not c.remat else []
    candidates += [{"micro_batch_size": m, "mini_batch_size": outer}
                   for m in range(prompts - 1, 0, -1) if outer % m == 0]
    candidates += [{"max_new_tokens": t} for t in range(c.max_new_tokens // 64 * 64, 127, -64)
                   if t < c.max_new_tokens]
    if c.batch_size > 1:
        candidates.append({"batch_size": 1, "mini_batch_size": None, "micro_batch_size": None})
    found, tried = [], set()
    for change in candidates:
        key = next(iter(change))
        if key in tried:
            continue
        trial = memory_plan(dataclasses.replace(c, **change), platform=plan.platform,
                            devices=plan.devices, memory_gib=plan.memory_gib,
                            shapes=plan.shapes)
        if trial.fits:
            tried.add(key)
            sets = " ".join(f"--set {k}={_spelled(v)}" for k, v in change.items()
                            if getattr(c, k) != v)
            found.append(f"{sets} ({trial.peak_gib:.2f} GiB)")
    return found


def _spelled(value) -> str:
    """A value as ``--set`` reads it back."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def accelerator_presets() -> list[tuple[str, str]]:
    """``(preset, platform)`` for each preset :data:`PLATFORM_PRESETS` sizes, once each."""
    seen: dict[str, str] = {}
    for platform, (preset, _) in PLATFORM_PRESETS.items():
        seen.setdefault(preset, platform)
    return list(seen.items())


def summary(plans: dict[str, MemoryPlan]) -> str:
    """One line per plan (keyed by preset name): platform, peak, usable memory, verdict."""
    lines = [f"{'preset':<16}{'platform':<17}{'devices':<16}{'peak GiB':>9}{'usable GiB':>12}"]
    for name, plan in plans.items():
        devices = f"{plan.devices} x {plan.memory_gib:g} GiB"
        lines.append(f"{name:<16}{plan.platform:<17}{devices:<16}{plan.peak_gib:>9.2f}"
                     f"{plan.usable_gib:>12.2f}  {'FITS' if plan.fits else 'DOES NOT FIT'}")
    return "\n".join(lines)
