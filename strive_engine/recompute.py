"""Activation checkpointing by memory: recompute only the layers the update's memory needs.

    parallel.activation_checkpointing = "auto"      (the default; "true": every layer, "false": none)

Why. Recomputing a layer in backward costs its forward again: with every layer checkpointed the update does
8 instead of 6 FLOPs per parameter and token, a third more time for the stage that is most of a step at a real
model's shape. The prompt sharing of `strive_engine.prompt_sharing` made the update's sequences ~4.5x shorter
(one prompt per G answers), and with it the activations: at `gpu_3b` (Qwen2.5-VL-3B, one prompt of ~2,300 tokens
+ 8 x 256 answer tokens and one 8,192-patch video per micro-batch) the decoder keeps ~139 KiB per token and layer
(~22 GB for the micro-batch) and the vision tower ~62 KiB per patch and block (~17 GB), next to ~60 GB of fp32
weights, gradients and AdamW moments: it fits a 141 GB H200 without recomputing anything. A 7B model on 80 GB
cards may need some of it. "auto" decides per forward, from numbers measured on the run's own device.

How.
  1. `measure` (once, at build): one small forward of the policy (a prompt with a 1 x 8 x 8-patch video and two
     16-token answers) under saved-tensor hooks, nothing checkpointed: the bytes each decoder layer keeps for
     backward per token it runs, and each vision block per patch (parameters excluded, each storage counted
     once, for the first layer that saves it). The run's device, dtype, attention implementation and kernel
     patches (liger) decide those bytes, so nothing is modelled, except the split attention's per-answer key
     rows (`strive_engine.split_attention`), which grow with answers x prompt length and are counted per row.
     Under `model.shared_attention = auto` the probe runs once per attention path (`measure_paths`: the one
     masked call, and the split, which keeps the K/V heads grouped on CUDA) and each forward is planned from the
     path it takes. The probe has no backward: the trainer reshards every FSDP group after it
     (`parallel.reshard_all`). The gradients still to come are counted on the FSDP2 shards, listed right after
     sharding (`track_gradients`).
  2. `plan` (every forward with grad, from `Policy.forward`, which knows the tokens it runs and the patches its
     vision tower sees): predicted peak = memory allocated now + gradients not allocated yet + the layers'
     kept bytes + the attention mask + the loss head (its lm_head-sized gradient formed in forward, its logits
     chunk, hidden-sized buffers) + twice the largest layer (the backward's working set). Over the budget, layers
     are checkpointed (a checkpointed layer keeps only its input) in the order of bytes saved per recomputed
     FLOP, the fewest that fit; when even all of them do not, all are.
  3. `set`: transformers' own per-layer switch (`GradientCheckpointingLayer.gradient_checkpointing`, non-reentrant
     `torch.utils.checkpoint` installed by `gradient_checkpointing_enable`), so the module tree and checkpoint keys
     do not change; on for that forward only (the backward recomputes what it chose; a switch left on would make
     the next prefill drop its K/V cache). The choice is per rank; FSDP2 unshards a layer for its backward before
     the recompute either way, so the collectives are the same whatever each rank recomputes (tested with two
     ranks, one recomputing every layer and one none: the weights are bitwise those of a run without it).

Found on the way: the model runs in eval mode (build_model), and transformers checkpoints a layer only in
training mode, so `activation_checkpointing = true` had never recomputed anything; `set` now switches the
layer's own `training` flag with it (tests/test_recompute.py shows both).

Budget: `parallel.memory_budget_gib`, or 0 = 90 % of the GPU's memory. On the CPU, 0 means no limit (nothing is
recomputed, as before "auto"); with a budget set the CPU plans from the activations alone (no allocator counter).
Recomputation is exact (the same kernels on the same inputs): losses and gradients do not depend on the choice
(tests/test_recompute.py).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from strive_engine.split_attention import kept_kv_heads

log = logging.getLogger(__name__)

MODES = ("auto", "true", "false")
BUDGET_FRACTION = 0.9          # of the GPU's memory, when parallel.memory_budget_gib = 0
PROBE_GRID = (1, 8, 8)         # the probe's video: one temporal patch of 8 x 8 patches
PROBE_ANSWER = 16              # tokens of each of the probe's two answers


def _numel_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p          # an FSDP2 DTensor: this rank's shard
    return local.numel() * local.element_size()


def saved_bytes(fn: Callable[[], Any], groups: dict[str, list[nn.Module]]) -> tuple[Any, dict[str, list[int]]]:
    """Run fn() with autograd's saved-tensor hooks: (its result, {group: bytes each module kept for backward}),
    plus "other" for what was saved outside every module. A storage counts once (for the first module that saves
    it); parameters (and views of them) are not counted: they exist without the forward."""
    owner: list[tuple[str, int]] = [("other", 0)]
    kept: dict[str, list[int]] = {g: [0] * len(ms) for g, ms in groups.items()}
    kept["other"] = [0]
    seen: set[int] = set()
    handles = []

    def enter(key):
        def hook(*_):
            owner.append(key)
        return hook

    def leave(*_):
        owner.pop()

    for g, modules in groups.items():
        for i, m in enumerate(modules):
            handles.append(m.register_forward_pre_hook(enter((g, i))))
            handles.append(m.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        # a weight saved by a matmul (FSDP2's all-gathered copy is a Parameter too) is not an activation
        if not isinstance(base, nn.Parameter) and not (base.is_leaf and base.requires_grad):
            s = t.untyped_storage()
            if s.data_ptr() not in seen and s.nbytes():
                seen.add(s.data_ptr())
                g, i = owner[-1]
                kept[g][i] += s.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for h in handles:
            h.remove()
    return out, kept


@dataclass
class Unit:
    """One kind of checkpointable layer: its modules, the bytes one keeps per token (patch) run without and with
    checkpointing, and the forward FLOPs one recompute costs per token (2 x its parameters)."""

    name: str
    modules: list[nn.Module]
    kept: float = 0.0
    boundary: float = 0.0
    flops: float = 1.0
    shared: float = 0.0      # bytes per token (patch) saved once for all the unit's modules (rotary tables)

    def saved_per_flop(self) -> float:
        return (self.kept - self.boundary) / self.flops


class Recompute:
    """The checkpointing plan of one policy (see the module docstring). `policy.recompute = Recompute(...)`."""

    def __init__(self, hf: nn.Module, mode: str, budget_bytes: int | None, device: torch.device,
                 compute_bytes: int = 2):
        from strive_engine.parallel import _decoder_layers, _vision_blocks

        if mode not in MODES:
            raise ValueError(f"parallel.activation_checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
        self.hf, self.mode, self.budget, self.device = hf, mode, budget_bytes, device
        self.compute_bytes = compute_bytes   # bytes per element of the forward's activations (2 under bf16)
        self.units = [Unit("decoder", _decoder_layers(hf)), Unit("vision", _vision_blocks(hf))]
        for u in self.units:
            if u.modules:
                u.flops = 2.0 * sum(p.numel() for p in u.modules[0].parameters())
        text = hf.config.get_text_config()
        self.hidden = int(text.hidden_size)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or self.hidden // heads)
        # what a decoder layer keeps per key row its attention gathers per answer (strive_engine.split_attention:
        # keys and values): it grows with answers x prompt length, not with the tokens run. The KV heads are
        # repeated per query head under a boolean mask (prompts of several lengths); with one prompt length they
        # stay grouped where flash takes them so (`kept_kv_heads`: on CUDA in bf16 / fp16)
        dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(compute_bytes, torch.bfloat16)
        kv_heads = kept_kv_heads(heads, int(getattr(text, "num_key_value_heads", None) or heads), head_dim, dtype,
                                 device)
        self.kv_row_bytes = 2 * heads * head_dim * compute_bytes
        self.kv_row_bytes_grouped = 2 * kv_heads * head_dim * compute_bytes
        self.measured = False
        self.vision_trained = any(p.requires_grad for m in self.units[1].modules for p in m.parameters())
        self.other = 0.0                     # bytes per token kept outside the layers (embeddings, final norm, ...)
        self.recomputed = {u.name: 0 for u in self.units}
        self._over_budget_said = False
        self.history: list[dict[str, float]] = []
        self._seen: tuple[int, int, int, float, str] | None = None
        # per attention path ("one": one call over the layout, "split": strive_engine.split_attention) the probe's
        # numbers: {unit name: (kept, shared)} and "other"; `plan` loads the path its forward takes
        self.paths: dict[str, dict[str, Any]] = {}
        self._grad_bytes: list[tuple[nn.Parameter, int]] | None = None
        self._param_bytes = self._param_elems = 0    # every parameter's local shard (trainable or not), at tracking
        self._unsharded_grads: int | None = None    # see expect_unsharded_gradients
        self._window_world = 0                      # > 0 while an update accumulates unsharded (weights gathered)
        self.set_all(False)                  # on only inside a forward with grad (`plan`, then Policy.forward)

    @property
    def active(self) -> bool:
        """Plans per forward: "auto" with a budget (a GPU, or a budget set on the CPU)."""
        return self.mode == "auto" and self.budget is not None

    @classmethod
    def build(cls, hf: nn.Module, mode: str, budget_gib: float, device: torch.device, compute_bytes: int = 2
              ) -> "Recompute":
        if budget_gib < 0:
            raise ValueError(f"parallel.memory_budget_gib must be >= 0, got {budget_gib}")
        budget = int(budget_gib * 2**30) if budget_gib > 0 else None
        if budget is None and device.type == "cuda":
            budget = int(torch.cuda.get_device_properties(device).total_memory * BUDGET_FRACTION)
        if mode == "true" or (mode == "auto" and budget is not None):  # the checkpoint function on every layer;
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # `set` switches
        return cls(hf, mode, budget, device, compute_bytes)

    # ------------------------------------------------------------------ switches

    def set_all(self, on: bool) -> None:
        for u in self.units:
            self.set(u, len(u.modules) if on else 0)

    def set(self, unit: Unit, n: int) -> None:
        """Checkpoint the first n modules of `unit`, run the rest normally."""
        for i, m in enumerate(unit.modules):
            on = i < n and hasattr(m, "_gradient_checkpointing_func")
            # transformers checkpoints a layer only in training mode, and the engine keeps the model in eval mode
            # (build_model: no dropout anywhere, so rollout and trainer compute the same log-probs): the switch
            # sets the layer's own `training` flag, which nothing else in a Qwen-VL layer reads (its children's
            # flags are untouched)
            m.gradient_checkpointing = m.training = on
        self.recomputed[unit.name] = min(n, len(unit.modules))

    # ------------------------------------------------------------------ measure

    def probe_inputs(self, policy: Any, tokenizer: Any, prompt_style: str) -> Any:
        """Two rows sharing a prompt with a small video (PROBE_GRID) and PROBE_ANSWER answer tokens each;
        no random numbers are drawn."""
        from strive_engine.policy import PolicyInputs
        from strive_engine.rollout import RolloutRequest, encode_prompts

        vc = self.hf.config.vision_config
        dim = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        t, h, w = PROBE_GRID
        n = t * h * w
        pix = torch.linspace(-1.0, 1.0, n * dim).reshape(n, dim)
        question = types.SimpleNamespace(question="What happens in the video?", options=(), problem_type="free-form")
        ids = encode_prompts(policy, tokenizer, [RolloutRequest(question, pix, torch.tensor([t, h, w]), 1.0)],
                             prompt_style)[0]
        answer = [int(x) for x in tokenizer.encode(" the answer is" * PROBE_ANSWER, add_special_tokens=False)]
        answer = (answer * PROBE_ANSWER)[:PROBE_ANSWER]
        row = torch.tensor(ids + answer)
        L, P = len(row), len(ids)
        comp = torch.zeros(2, L, dtype=torch.long)
        comp[:, P:] = 1
        x = PolicyInputs(row.repeat(2, 1), torch.ones(2, L, dtype=torch.long), comp, pix,
                         torch.tensor([[t, h, w]]), torch.tensor([1.0]), torch.zeros(2, dtype=torch.long))
        return x.to(self.device)

    def measure(self, run: Callable[[Any], Any], inputs: Any) -> None:
        """Bytes kept per token / patch by each kind of layer, from one forward `run(inputs)` with nothing
        checkpointed (run goes through the FSDP root: `lambda x: root(policy, x, head)`)."""
        self.set_all(False)
        self._seen = None
        self.measured = False                # so the probe's own plan checkpoints nothing (a second probe too)
        groups = {u.name: u.modules for u in self.units if u.modules}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            out, kept = saved_bytes(lambda: run(inputs), groups)
        del out
        if self._seen is None:
            raise RuntimeError("Recompute.measure: the probe's forward did not report its sizes (Policy.forward "
                               "calls Recompute.plan)")
        tokens, patches, mask, kv_bytes, path = self._seen
        for u in self.units:
            if not u.modules:
                continue
            n = max(tokens if u.name == "decoder" else patches, 1)
            if u.name == "decoder":                  # the per-answer key rows: counted apart (see kv_row_bytes)
                kept[u.name] = [b - kv_bytes for b in kept[u.name]]
            per = min(kept[u.name])                  # a layer's own; the first one also saves what all of them
            shared = sum(kept[u.name]) - per * len(u.modules)          # read (rotary tables, the decoder's mask)
            u.kept = per / n
            u.shared = max(shared - (mask * self.compute_bytes if u.name == "decoder" else 0), 0) / n
            width = self.hidden if u.name == "decoder" else int(self.hf.config.vision_config.hidden_size)
            u.boundary = float(width * self.compute_bytes)             # a checkpointed layer keeps its input
        self.other = kept["other"][0] / max(tokens, 1)
        self.paths[path] = {"other": self.other, **{u.name: (u.kept, u.shared) for u in self.units}}
        self.measured = True
        log.info("activation checkpointing auto (%s attention): a decoder layer keeps %.1f KiB per token, a vision "
                 "block %.1f KiB per patch; budget %.1f GiB", path, self.units[0].kept / 1024,
                 self.units[1].kept / 1024 if self.units[1].modules else 0.0, (self.budget or 0) / 2**30)
        self.set_all(False)

    def measure_paths(self, policy: Any, run: Callable[[Any], Any], inputs: Any,
                      after: Callable[[], None] = lambda: None) -> None:
        """`measure` once per attention path the policy's forwards can take: under `shared_attention = auto` the
        probe's own layout would take the one call (it saves too few pairs to split) while a real-sized micro-batch
        splits, and the two keep different bytes per token (the split keeps K/V grouped, the masked call repeated).
        `after()` runs after each probe (under FSDP2: reshard every group, as a forward without backward leaves the
        root's unsharded)."""
        mode = policy.shared_attention
        try:
            for forced in (("masked", "split") if mode == "auto" else (mode,)):
                policy.shared_attention = forced
                self.measure(run, inputs)
                after()
        finally:
            policy.shared_attention = mode

    def _use(self, path: str) -> None:
        """Load the numbers measured on `path` (the only ones measured when the other was not)."""
        got = self.paths.get(path)
        if got is None:
            return
        self.other = got["other"]
        for u in self.units:
            u.kept, u.shared = got[u.name]

    # ------------------------------------------------------------------ plan

    def head_bytes(self, tokens: int) -> float:
        """The loss head's buffers: lm_head's gradient formed in forward (compute dtype), its logits chunk, the
        packed hidden states and their gradient."""
        from strive_kernels.logprob import DEFAULT_MAX_CHUNK_BYTES

        V, H = self.hf.lm_head.weight.shape
        return (V * H + 2 * tokens * self.hidden) * self.compute_bytes + DEFAULT_MAX_CHUNK_BYTES

    def track_gradients(self, params: Any) -> None:
        """The parameters whose gradients backward allocates, with their local shard bytes. Called with the FSDP2
        shards right after sharding, outside any forward: inside the root's forward FSDP2 puts unsharded copies on
        the modules, whose .grad stays None (listed then, the root group's embeddings and lm_head would count as
        pending forever, at bf16 size, and their fp32 shards' gradients not at all)."""
        params = list(params)
        self._grad_bytes = [(p, _numel_bytes(p)) for p in params if p.requires_grad]
        self._param_bytes = sum(_numel_bytes(p) for p in params)
        self._param_elems = sum(_numel_bytes(p) // p.element_size() for p in params)

    def pending_gradients(self) -> int:
        """Bytes of the gradients backward will allocate (parameters that need one and have none yet); the list is
        taken once (`track_gradients`, or at the first plan of a model without FSDP): a forward then only checks
        which have no gradient (hundreds of parameters at 3B, every micro-batch)."""
        if self._grad_bytes is None:
            self.track_gradients(self.hf.parameters())
        if self._unsharded_grads is not None:
            return self._unsharded_grads * sum(b for _, b in self._grad_bytes)
        return sum(b for p, b in self._grad_bytes if p.grad is None)

    def expect_unsharded_gradients(self, scale: int | None) -> None:
        """While the update accumulates gradients unsharded (`parallel.accumulation`), the shards' .grad stays None
        and FSDP2 holds full-size accumulators instead: `scale` = the world size before the window's first
        backward (accumulators of world x shard bytes still to come), 0 after it (allocated: the allocator counts
        them), None when the window has closed (the shards' gradients again)."""
        self._unsharded_grads = scale
        self._window_world = 0 if scale is None else (scale or self._window_world)

    def state_bytes(self) -> int:
        """What an update holds by design, from sizes alone (not the allocator's count, which also holds whatever
        else happens to be alive, e.g. the next step's prefetched videos): the parameter shards, the AdamW moments
        of the trainable ones (two per element, counted before the first step allocates them, so every step sees
        the same number), their gradients (whole-size while they accumulate unsharded), and then also the weights
        gathered whole in the compute dtype (`expect_unsharded_gradients`)."""
        if self._grad_bytes is None:
            self.track_gradients(self.hf.parameters())
        trained = sum(b for _, b in self._grad_bytes)
        world = self._window_world
        gathered = world * self._param_elems * self.compute_bytes        # every group is gathered, frozen ones too
        return self._param_bytes + 2 * trained + max(world, 1) * trained + gathered

    def packing_free(self, held: int = 0) -> float | None:
        """What the budget leaves an update micro-batch's activations by `state_bytes` (+ `held`: the rollout batch,
        a reference model), for sizing micro-batches (`strive_engine.micro_batches`): deterministic, so identical
        runs (and a resumed one) cut identical micro-batches and sum their gradients in the same order; the plan of
        each forward still checks the allocator's count and recomputes layers if the rest does not fit. None where
        nothing is planned (no budget, a mode other than auto, or before `measure`)."""
        if not (self.active and self.measured):
            return None
        return float(self.budget - self.state_bytes() - held)

    def predict(self, counts: dict[str, int], tokens: int, patches: int, extra: int, kv_bytes: float = 0) -> float:
        """Activation bytes of one forward + backward with counts[unit] modules of each unit checkpointed
        (`kv_bytes`: what each decoder layer keeps of the split attention's gathered keys and values)."""
        total, largest = self.other * tokens + extra + self.head_bytes(tokens), 0.0
        for u in self.units:
            n = tokens if u.name == "decoder" else patches
            k = counts.get(u.name, 0)
            layer = n * u.kept + (kv_bytes if u.name == "decoder" else 0)
            total += (len(u.modules) - k) * layer + n * (k * u.boundary + u.shared)
            largest = max(largest, layer)
        return total + 2 * largest

    def choose(self, tokens: int, patches: int, extra: int, free: float, kv_bytes: float = 0) -> dict[str, int]:
        """The fewest modules to checkpoint (in the order of bytes saved per recomputed FLOP) for the forward's
        activations to fit `free` bytes; all of them when nothing smaller fits."""
        counts = {u.name: 0 for u in self.units}
        order = sorted((u for u in self.units if u.modules and (u.name == "decoder" or patches)),
                       key=lambda u: -u.saved_per_flop())
        for u in order:
            over = self.predict(counts, tokens, patches, extra, kv_bytes) - free
            if over <= 0:
                return counts
            n = tokens if u.name == "decoder" else patches
            step = n * (u.kept - u.boundary) + (kv_bytes if u.name == "decoder" else 0)
            counts[u.name] = min(len(u.modules), int(-(-over // step)) if step > 0 else len(u.modules))
        if self.predict(counts, tokens, patches, extra, kv_bytes) > free:
            counts.update({u.name: len(u.modules) for u in order})
        return counts

    def _sizes(self, patches: int, mask_elems: int, split: tuple[int, bool] | None) -> tuple[int, int, float, str]:
        """(patches kept for backward, the mask's bytes, the split attention's key-row bytes per layer, path) for a
        forward whose split attention gathers split = (key rows, boolean mask needed), or None: one call."""
        patches = patches if self.vision_trained else 0     # a frozen tower keeps nothing for backward
        path = "one" if split is None else "split"
        kv_bytes = 0 if split is None else split[0] * (self.kv_row_bytes if split[1] else self.kv_row_bytes_grouped)
        return patches, mask_elems * self.compute_bytes, kv_bytes, path

    def resident_bytes(self) -> int:
        """Memory the next forward starts from: allocated now (CUDA's allocator; 0 on the CPU) + gradients to come."""
        resident = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        return resident + self.pending_gradients()

    def activation_bytes(self, tokens: int, patches: int, mask_elems: int = 0,
                         split: tuple[int, bool] | None = None) -> float:
        """Predicted activation bytes of a forward + backward of these sizes (`plan`'s, the split attention's as
        `split_attention.split_shape` gives them) with nothing recomputed: what `strive_engine.micro_batches`
        packs micro-batches by."""
        patches, extra, kv_bytes, path = self._sizes(patches, mask_elems, split)
        self._use(path)
        return self.predict({}, tokens, patches, extra, kv_bytes)

    def plan(self, tokens: int, patches: int, mask_elems: int = 0, layout: Any = None) -> None:
        """Called by `Policy.forward` before a forward with grad: `tokens` the language model runs (padding
        included), `patches` the vision tower runs, `mask_elems` the elements of its attention mask, `layout` the
        split attention's (`strive_engine.split_attention.SplitLayout`; None: one call): its answers' gathered key
        rows are counted per row, with their KV heads grouped when no boolean mask is needed (`kept_kv_heads`)."""
        split = None if layout is None else (layout.k_index.numel(), layout.mask is not None)
        patches, extra, kv_bytes, path = self._sizes(patches, mask_elems, split)
        self._seen = (tokens, patches, mask_elems, kv_bytes, path)
        self._use(path)
        if self.mode == "true":
            self.set_all(True)    # every forward: Policy.forward switches them off again after each one
        if not (self.active and self.measured):
            return
        resident = self.resident_bytes()
        counts = self.choose(tokens, patches, extra, self.budget - resident, kv_bytes)
        for u in self.units:
            self.set(u, counts[u.name])
        peak = resident + self.predict(counts, tokens, patches, extra, kv_bytes)
        self.history.append({"recomputed_layers": counts["decoder"], "recomputed_blocks": counts["vision"],
                             "predicted_peak_gib": peak / 2**30})
        if peak > self.budget and not self._over_budget_said:   # once per run, by the rank it happens on
            self._over_budget_said = True
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            log.warning("activation checkpointing auto (rank %d): a forward of %d tokens and %d patches is predicted "
                        "to peak at %.1f GiB with %d decoder layers and %d vision blocks recomputed, above the "
                        "%.1f GiB budget (parallel.memory_budget_gib): expect an out-of-memory error; lower "
                        "parallel.micro_batch_size, rollout.max_new_tokens or the frames / pixels per video", rank,
                        tokens, patches, peak / 2**30, counts["decoder"], counts["vision"], self.budget / 2**30)

    def reset(self) -> None:
        self.history = []

    def summary(self) -> dict[str, float]:
        """The largest of each number over the forwards planned since the last call (step metrics), which it
        then forgets; {} when nothing was planned (no budget: nothing is recomputed)."""
        out = {f"memory/{k}": max(h[k] for h in self.history) for k in self.history[0]} if self.history else {}
        self.history = []
        return out
