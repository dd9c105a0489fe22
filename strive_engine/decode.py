"""The native decode engine (rollout.backend = "native"): each prompt prefilled once, G answers decoded against it.

    engine = DecodeEngine(policy)                      # reads the policy's (unsharded) parameters in place
    out = engine.generate(prompts, G, spec, max_new_tokens, eos_ids, pad_id)   # prompts: PolicyInputs, one row
    out.tokens, out.logprobs, out.finished              # per request: (R*G, T) int64, (R*G, T) fp32, (R*G,) bool

Why not HF `generate`: for G answers per (question, variant) it prefills every prompt and its video G times,
and it is bound by launches and host syncs (it syncs on every token to sample and to test for stopping).
Measured on an H200: ~28 ms per decode step for a 0.17 B model whose weights are read in ~0.1 ms. Here:

1. Prefill once per request. The vision tower runs once per video and the language model runs once over each
   prompt (HF's own forward, so every family's attention, mRoPE and Qwen3-VL deepstack are HF's); its K/V is
   kept once per request as the prefix (R, Hkv, Lp, D), left-padded, and the first-token logits are broadcast
   to the request's G rows.
2. Decode. Our own step runs HF's decoder blocks from their parameters (read in place each step) on the
   M = R*G new tokens, with HF's arithmetic and rounding points: GEMMs by cuBLAS, the elementwise work in two
   fused kernels (`strive_kernels.decode_layer`: residual add + RMSNorm, SiLU * up; torch twins on the CPU).
   Attention is `strive_kernels.rope_shared_prefix_attention`: the rotary of q and k and the K/V cache write
   inside the two attention kernels (`fuse_rope=False`: a `rope_cache` launch before them, one more per layer),
   then one exact softmax over the shared prefix (read once per step for all G rows) and each row's suffix, a
   static cache of max_new_tokens slots. GQA is handled there.
3. Positions. The prompt's mRoPE positions come from the model's get_rope_index (every family's own rules, with
   Qwen3-VL's timestamps and interleaving). A generated token is text: its three mRoPE axes are equal, to the
   prompt's last position + 1 + t (the prompt ends with text), so its rotary angles are the plain 1-D ones at
   that position for every family (the per-axis sections and Qwen3-VL's interleaving select among equal values).
   That is where HF generate puts it and where `Policy.positions` scores it. It is not always max(prompt
   position) + 1: transformers >= 5.3 places text after a video at the video's start + max(h, w) / merge, below
   its temporal positions when (t - 1) x interval exceeds that (a long video; tests/test_decode.py).
4. Sampling on the device (strive_engine.sampling): no sync, graph-capturable; each sampled token's log-prob
   under the sampling distribution is recorded. On CUDA, without top-k / top-p, one Triton pass over the logits
   (`strive_kernels.sample_tokens`) whose Philox noise is keyed by a seed drawn once per call from the device's
   default generator plus the completion index: the eight-kernel torch chain it replaces was ~0.40 ms of a 5.02 ms
   step at the 3B shape (H200 profile, 2026-12-04).
5. Stopping on the device: a row is finished once it has produced any EOS id; later tokens are pad with
   log-prob 0. "All rows finished" is read every `check_every` tokens through a pinned buffer and an event one
   window behind, so the device always has a window of work queued and the host never waits per token.
6. On CUDA the step is captured as a CUDA graph once per `generate` call (after one eager warm-up step) and
   replayed. The graph reads the parameters where FSDP2's unshard put them, without a copy (except the q/k/v
   projections, stacked once per call into one weight per layer: one GEMM instead of three; the three small
   ones were 0.42 ms of a 5.02 ms step at the 3B shape on an H200, `pack_qkv=False` keeps them); it is captured
   and freed inside the call, during which the caller keeps the parameters unsharded, so it can never replay
   against moved or freed memory (the parameter addresses are also checked before every window). The
   capture costs a few ms against a rollout of seconds (`capture_graph`: unlike torch.cuda.graph it flushes no
   cache; a capture that fails leaves the caller's stream in place and the process decodes eagerly from then on).
7. Memory: the prefix and suffix caches are allocated per call from the batch's sizes and freed on return.

On the CPU the same step runs eagerly (and compiles with torch.compile(fullgraph=True): no host sync inside).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from strive_engine.policy import Policy, PolicyInputs, VisualTokens
from strive_engine.sampling import SamplingSpec, sample_next
from strive_kernels import rope_shared_prefix_attention, sampling_seed, shared_prefix_attention
from strive_kernels.decode_layer import add_rmsnorm, rope_cache, silu_mul

log = logging.getLogger(__name__)


class DecodeError(ValueError):
    """A request the engine cannot serve (too long for the model's context, bad sizes); the message names it."""


@dataclass
class Prefix:
    """The prompts of R requests after prefill: K/V per layer (R, Hkv, Lp, D), left-padded (columns < start[r]
    are padding), start (R,) int32, next_pos (R,) int64 = last prompt position + 1, logits (R, V) of the first
    new token, visual: the requests' merged visual tokens."""

    keys: list[Tensor]
    values: list[Tensor]
    start: Tensor
    next_pos: Tensor
    logits: Tensor
    visual: VisualTokens | None = None   # the prompts' merged visual tokens (reused by old log-probs)


@dataclass
class DecodeState:
    """The static buffers one decode step reads and updates in place (M = R*G rows, T = max_new_tokens)."""

    prefix: Prefix
    k_suffix: list[Tensor]     # per layer (R, G, Hkv, T, D)
    v_suffix: list[Tensor]
    token: Tensor              # (M,) int64: the token fed to the next step
    t: Tensor                  # (1,) int64: its index in the completion (= suffix slot)
    base_pos: Tensor           # (M,) int64: position of completion token 0
    done: Tensor               # (M,) bool: the row has produced an EOS
    tokens: Tensor             # (M, T) int64 output (pad after EOS)
    logprobs: Tensor           # (M, T) fp32 output (0 after EOS)
    eos: Tensor                # (E,) int64 stop ids
    pad_id: int
    spec: SamplingSpec
    logits: Tensor | None = None  # (M, T, V) fp32, only when asked for (tests)
    qkv: list[tuple[Tensor, Tensor | None]] | None = None  # per layer: q/k/v weights (and biases) stacked
    seed: Tensor | None = None  # (1,) int64: the fused sampler's Philox seed (CUDA; drawn once per call)


@dataclass
class Generation:
    """Rows request-major (row m: request m // G). tokens/logprobs (M, T) on the host: pad / 0 after the row's
    EOS and after the last step run; finished (M,): an EOS was produced; logits (M, T, V) only if asked."""

    tokens: Tensor
    logprobs: Tensor
    finished: Tensor
    steps: int
    logits: Tensor | None = None
    timings_ms: dict[str, float] | None = None   # prefill, first_token, [warmup_step, capture,] decode
    visual: VisualTokens | None = None           # the requests' merged visual tokens (on the device)


def _now(cuda: bool) -> Any:
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    import time

    return time.perf_counter()


class DecodeEngine:
    """Decode for a Qwen2-VL / Qwen2.5-VL / Qwen3-VL `Policy` (see the module docstring). Holds references to the
    model's modules; the only weights it copies are the stacked q/k/v projections (`pack_qkv`, per generate call).
    fuse_rope=False runs the rotary and cache write as their own launch (`rope_cache`), for benchmarks."""

    def __init__(self, policy: Policy, pack_qkv: bool = True, fuse_rope: bool = True):
        self.policy = policy
        self.pack_qkv = pack_qkv
        self.fuse_rope = fuse_rope
        hf = policy.hf
        lm = hf.model.language_model
        self.lm, self.layers, self.lm_head = lm, list(lm.layers), hf.lm_head
        cfg = hf.config.get_text_config()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
            raise DecodeError(f"the native decode engine supports full attention only, this model has layer types "
                              f"{sorted(kinds)} (use_sliding_window={getattr(cfg, 'use_sliding_window', False)}); "
                              f"use --rollout.backend=hf")
        rotary = lm.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise DecodeError(f"rope_type {rope_type!r} changes its frequencies with the length; the native decode "
                              f"engine supports static ones (default, linear, yarn, llama3): use --rollout.backend=hf")
        self.inv_freq = rotary.inv_freq
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        self.eps = float(cfg.rms_norm_eps)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise DecodeError(f"the native decode engine's MLP is SwiGLU (silu); this model has hidden_act="
                              f"{cfg.hidden_act!r}: use --rollout.backend=hf")

    # ------------------------------------------------------------------------------------------ checks

    def check(self, prompt_lengths: list[int], max_new_tokens: int) -> None:
        """Before any compute: every request fits the model's context with max_new_tokens more tokens."""
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not self.max_positions:
            return
        for i, n in enumerate(prompt_lengths):
            if n > self.max_positions:
                raise DecodeError(f"request {i}: its prompt has {n} tokens, longer than the model's context of "
                                  f"{self.max_positions} (max_position_embeddings)")
            if n + max_new_tokens > self.max_positions:
                raise DecodeError(f"request {i}: prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the "
                                  f"model's context of {self.max_positions} (max_position_embeddings); lower "
                                  f"rollout.max_new_tokens or the frames/pixels per video")

    # ------------------------------------------------------------------------------------------ prefill

    def prefill(self, prompts: PolicyInputs) -> Prefix:
        """Vision tower + language model over R left-padded prompts (one row per request), K/V kept."""
        if prompts.visual is None:  # vision tower once per request; kept for the step's other forwards
            prompts = replace(prompts, visual=self.policy.visual_tokens(prompts))
        embeds, pos, extra = self.policy.input_embeddings(prompts)               # (R, Lp, H), (3, R, Lp)
        mask = prompts.attention_mask
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
        keys, values = _cache_tensors(out.past_key_values, len(self.layers))
        logits = self.lm_head(out.last_hidden_state[:, -1])                      # (R, V): left-padded prompts
        valid = mask.bool()
        next_pos = pos[:, :, -1].amax(0) + 1                     # (R,) after the last token (left-padded prompts)
        start = (mask.shape[1] - valid.sum(1)).to(torch.int32)                    # (R,)
        return Prefix(keys, values, start, next_pos.long(), logits, prompts.visual)

    # ------------------------------------------------------------------------------------------ one step

    def _layer(self, i: int, x: Tensor, delta: Tensor | None, st: DecodeState, n: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder block i on the residual stream x (M, H), with the previous block's output `delta` still to be
        added (fused into this block's first norm); n = st.t + 1, the suffix length after this token. Returns
        (stream, this block's MLP output)."""
        layer = self.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        M = x.shape[0]
        R, G = st.prefix.start.shape[0], M // st.prefix.start.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x, h = add_rmsnorm(x, delta, layer.input_layernorm.weight, self.eps)            # (M, H)
        if st.qkv is not None:  # one GEMM; q, k, v are strided views of its output
            q, k, v = F.linear(h, *st.qkv[i]).split([Hq * D, Hkv * D, Hkv * D], dim=1)
            q, k, v = q.view(M, Hq, D), k.view(M, Hkv, D), v.view(M, Hkv, D)
        else:
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(M, Hq, D)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(M, Hkv, D)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(M, Hkv, D)
        ks, vs = st.k_suffix[i], st.v_suffix[i]                                          # (R, G, Hkv, T, D)
        qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if self.qk_norm else (None, None)
        kp, vp = st.prefix.keys[i], st.prefix.values[i]
        if self.fuse_rope:  # rotary, k / v -> slot t and attention: two launches
            o = rope_shared_prefix_attention(q, k, v, st.prefix.next_pos, st.t, self.inv_freq, self.rope_scaling,
                                             kp, vp, st.prefix.start, ks, vs, attn.scaling, qn, kn, self.eps)
        else:
            T = ks.shape[3]
            q = rope_cache(q, k, v, st.base_pos, st.t, self.inv_freq, self.rope_scaling, ks.view(M, Hkv, T, D),
                           vs.view(M, Hkv, T, D), qn, kn, self.eps)                       # k, v -> slot t
            o = shared_prefix_attention(q.view(R, G, Hq, D), kp, vp, st.prefix.start, ks, vs, n, attn.scaling)
        x, h = add_rmsnorm(x, F.linear(o.reshape(M, Hq * D), attn.o_proj.weight, attn.o_proj.bias),
                           layer.post_attention_layernorm.weight, self.eps)
        up = silu_mul(F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight))
        return x, F.linear(up, mlp.down_proj.weight)

    def step(self, st: DecodeState) -> None:
        """Feed st.token (completion token t) for every row, sample token t + 1, update the state in place.
        No host sync, no data-dependent shape: capturable as a CUDA graph, compilable with fullgraph=True."""
        x, delta = self.lm.embed_tokens(st.token), None                           # (M, H)
        n = st.t + 1  # once per step, not per layer: each add is a node of the graph (38 at the 3B shape before)
        for i in range(len(self.layers)):
            x, delta = self._layer(i, x, delta, st, n)
        _, h = add_rmsnorm(x, delta, self.lm.norm.weight, self.eps)
        logits = F.linear(h, self.lm_head.weight, self.lm_head.bias)              # (M, V)
        self._emit(st, logits, n)

    @staticmethod
    def _emit(st: DecodeState, logits: Tensor, col: Tensor) -> None:
        """Sample from logits (M, V) into column `col` of the outputs; finished rows get pad / 0."""
        token, logp = sample_next(logits, st.spec, seed=st.seed, step=col)
        token = torch.where(st.done, st.pad_id, token)
        logp = logp.masked_fill(st.done, 0.0)
        st.tokens.index_copy_(1, col, token[:, None])
        st.logprobs.index_copy_(1, col, logp[:, None])
        if st.logits is not None:
            st.logits.index_copy_(1, col, logits.float()[:, None])
        st.done |= (token[:, None] == st.eos[None]).any(-1)
        st.token.copy_(token)
        st.t += 1

    # ------------------------------------------------------------------------------------------ generate

    def new_state(self, prefix: Prefix, G: int, max_new_tokens: int, spec: SamplingSpec, eos_ids: list[int],
                  pad_id: int, keep_logits: bool = False) -> DecodeState:
        """Allocate the suffix caches and outputs and sample completion token 0 from the prefill logits."""
        R = prefix.start.shape[0]
        M, T, dev = R * G, max_new_tokens, prefix.logits.device
        dtype = prefix.keys[0].dtype
        shape = (R, G, self.num_kv_heads, T, self.head_dim)
        st = DecodeState(
            prefix=prefix, k_suffix=[torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers],
            v_suffix=[torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers],
            token=torch.zeros(M, dtype=torch.long, device=dev), t=torch.full((1,), -1, dtype=torch.long, device=dev),
            base_pos=prefix.next_pos.repeat_interleave(G), done=torch.zeros(M, dtype=torch.bool, device=dev),
            tokens=torch.full((M, T), pad_id, dtype=torch.long, device=dev),
            logprobs=torch.zeros(M, T, dtype=torch.float32, device=dev),
            eos=torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev), pad_id=pad_id, spec=spec,
            logits=torch.zeros(M, T, prefix.logits.shape[-1], device=dev) if keep_logits else None,
            qkv=self.packed_qkv() if self.pack_qkv else None,
            seed=sampling_seed(dev) if dev.type == "cuda" and not spec.greedy else None)
        # completion token 0 from the prompt's logits, broadcast to the G rows (t: -1 -> 0)
        self._emit(st, prefix.logits.repeat_interleave(G, 0), torch.zeros(1, dtype=torch.long, device=dev))
        return st

    def packed_qkv(self) -> list[tuple[Tensor, Tensor | None]]:
        """Per layer, the q, k and v projections stacked into one (Hq*D + 2*Hkv*D, H) weight (and bias): one GEMM
        per layer instead of three. A copy of the current parameters, taken once per generate call and freed with
        its state (at the 3B shape 377 MB, 6 % of the weights, copied in ~0.2 ms against a rollout of seconds);
        the graph reads it, so it follows the weights as long as the caller keeps them fixed during the call."""
        out = []
        for layer in self.layers:
            a = layer.self_attn
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            projs = (a.q_proj, a.k_proj, a.v_proj)
            b = None if all(m.bias is None for m in projs) else torch.cat(
                [m.bias if m.bias is not None else w.new_zeros(m.out_features) for m in projs])
            out.append((w.detach(), None if b is None else b.detach()))
        return out

    def generate(self, prompts: PolicyInputs, G: int, spec: SamplingSpec, max_new_tokens: int,
                 eos_ids: list[int], pad_id: int, *, cuda_graph: bool = True, check_every: int = 16,
                 keep_logits: bool = False) -> Generation:
        """R prompts (PolicyInputs with one row per request, no completion) -> G completions each.

        Sampling noise comes from the default generator of the device: seed it first (rollout does, inside
        torch.random.fork_rng). Call with the policy's parameters in place (unsharded under FSDP2)."""
        if prompts.num_rows != prompts.num_videos or not torch.equal(
                prompts.video_index.cpu(), torch.arange(prompts.num_rows)):
            raise DecodeError("generate: prompts must hold one row per request, row r using video r")
        self.check(prompts.attention_mask.sum(1).tolist(), max_new_tokens)
        cuda = self._cuda = prompts.input_ids.is_cuda
        self._marks = [("start", _now(cuda))]
        prefix = self.prefill(prompts)
        self._mark("prefill")
        st = self.new_state(prefix, G, max_new_tokens, spec, eos_ids, pad_id, keep_logits)
        self._mark("first_token")
        steps = self._run(st, max_new_tokens - 1, cuda_graph and cuda, check_every)
        self._mark("decode")
        out = Generation(tokens=st.tokens.cpu(), logprobs=st.logprobs.cpu(), finished=st.done.cpu(), steps=steps,
                         logits=st.logits.cpu() if st.logits is not None else None, timings_ms=self._timings(),
                         visual=prefix.visual)
        return out

    def _mark(self, name: str) -> None:
        self._marks.append((name, _now(self._cuda)))

    def _timings(self) -> dict[str, float]:
        """Milliseconds between consecutive marks (CUDA events or host clocks; read after the final copy)."""
        out = {}
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            out[name] = a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else 1e3 * (b - a)
        return out

    def _run(self, st: DecodeState, steps: int, graph: bool, check_every: int) -> int:
        """Run up to `steps` decode steps, stopping early once every row is finished. Returns the steps run."""
        if steps <= 0:
            return 0
        if not graph:
            for i in range(steps):
                self.step(st)
                if (i + 1) % check_every == 0 and bool(st.done.all()):
                    return i + 1
            return steps
        return self._run_graph(st, steps, check_every)

    def _param_addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.policy.hf.parameters())

    def _run_graph(self, st: DecodeState, steps: int, check_every: int) -> int:
        # Warm-up (Triton JIT, cuBLAS workspaces, allocator) as the first real step, on a side stream as
        # torch.cuda.graphs asks; then capture (records, runs nothing) and replay for the rest.
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self.step(st)
        cur.wait_stream(side)
        self._mark("warmup_step")
        if steps == 1:
            return 1
        if _CAPTURE["failed"]:
            return 1 + self._run(st, steps - 1, False, check_every)
        side.wait_stream(cur)
        try:
            graph = capture_graph(lambda: self.step(st), side)
        except RuntimeError as err:  # a capture records and runs nothing: the state is still after the warm-up step
            torch.cuda.synchronize()
            # torch's allocator may keep the failed capture's pool open (capture_end raised before closing it), and
            # what fails once (an op that cannot be captured) fails every time: no more captures in this process
            _CAPTURE["failed"] = True
            log.error("decode: CUDA graph capture failed (%s); this process decodes eagerly from now on",
                      str(err).splitlines()[0][:300])
            self._mark("capture_failed")
            return 1 + self._run(st, steps - 1, False, check_every)
        self._mark("capture")
        addresses = self._param_addresses()
        flags = [torch.zeros(1, dtype=torch.bool, pin_memory=True) for _ in range(2)]
        events: list[torch.cuda.Event | None] = [None, None]
        done_steps, window = 1, 0
        try:
            while done_steps < steps:
                n = min(check_every, steps - done_steps)
                if self._param_addresses() != addresses:
                    raise RuntimeError("decode: the policy's parameters moved during generate (were they resharded?); "
                                       "keep them unsharded for the whole call")
                for _ in range(n):
                    graph.replay()
                done_steps += n
                slot = window % 2
                flags[slot].copy_(st.done.all().view(1), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                events[slot] = ev
                # Read the flag of the window before this one: the device still has this window queued.
                prev = events[1 - slot]
                if prev is not None:
                    prev.synchronize()
                    if bool(flags[1 - slot][0]):
                        break
                window += 1
        finally:
            torch.cuda.current_stream().synchronize()
            del graph
        return done_steps


_CAPTURE = {"failed": False}  # set by the first capture that fails: the process decodes eagerly afterwards


def capture_graph(fn: Callable[[], Any], stream: Any) -> Any:
    """fn's CUDA work recorded (not run) as a torch.cuda.CUDAGraph on `stream`, which must already wait for the
    work fn reads. Not `torch.cuda.graph`: that context empties the caching allocator and the pinned-host cache on
    entry (once per generate call: the update after every rollout would allocate its working set anew), and it
    leaves the thread on its capture stream when capture_begin or capture_end raises (torch 2.11 / 2.13). Here
    the caller's stream is back whatever fails, and fn's own error is the one raised. thread_local: other
    threads' CUDA work (the prefetcher's NVDEC decodes) does not void the capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            fn()
        except BaseException:
            with contextlib.suppress(RuntimeError):
                graph.capture_end()  # ends the (invalidated) capture
            raise
        graph.capture_end()
    return graph


def _cache_tensors(cache: Any, num_layers: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer (R, Hkv, L, D) keys and values of an HF cache (transformers 5.x layers API, or the older
    key_cache / value_cache lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        keys, values = [lay.keys for lay in layers], [lay.values for lay in layers]
    else:
        keys, values = list(cache.key_cache), list(cache.value_cache)
    if len(keys) != num_layers:
        raise RuntimeError(f"prefill cache has {len(keys)} layers, the model {num_layers}")
    return keys, values
