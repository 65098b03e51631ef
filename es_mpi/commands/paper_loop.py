"""`es-mpi bench --baseline paper`: the ES paper's own per-member loop on the
same work, for generations per hour against it.

Re-expressed from the description of the reference scripts (Qiu et al. 2025,
es_fine-tuning_countdown.py), not copied: the model as `from_pretrained`
loads it in the working dtype; per member, every parameter is perturbed in
place with noise drawn *in the parameter's dtype* from a generator seeded by
the member's seed, all prompts are decoded with one plain `model.generate`
(greedy, no stop strings: it decodes to max_new_tokens unless EOS), the
completions are scored, and the noise is drawn again and subtracted; once
every member's reward is known (the paper all-reduces them; here one
Allgather), each tensor's update is accumulated member by member in the
parameter's dtype and added as alpha/N * sum z eps.  Every rank repeats the
update, as in the paper.  Its known faults (bf16 drift, the shared seed of
every tensor) are kept: this is a speed baseline, not a trainer.
"""
from __future__ import annotations


import numpy as np
import torch

from ..clock import Clock
from ..decode import format_prompts, greedy_config
from ..engine.noise import derive_seed
from ..scoring import OK, score_one


def _seed(run_seed: int, generation: int, member: int) -> int:
    # the paper draws member seeds with np.random.randint(0, 2**30); any fixed function will do for timing
    return derive_seed(run_seed, generation, member, domain="paper") % (1 << 30)


def _perturb(model, seed: int, scale: float) -> None:
    for p in model.parameters():
        g = torch.Generator(device=p.device).manual_seed(seed)
        p.data.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=scale)


@torch.no_grad()
def paper_generation(model, tok, task, cfg, comm, generation: int, batch: list) -> dict:
    """One generation of the paper's loop (members dealt round-robin to ranks,
    as the paper does); returns its wall seconds (the slowest rank's) and parts."""
    es = cfg.es
    members = range(comm.rank, es.population, comm.size)
    texts = format_prompts(tok, [e.prompt for e in batch], task.chat_template)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(next(model.parameters()).device)
    gcfg = greedy_config(model, tok, cfg.generation.max_new_tokens)
    width = enc["input_ids"].shape[1]
    rewards = np.full(es.population, np.nan)
    clock = Clock(enc["input_ids"].device)
    t0 = clock()
    t_noise = t_decode = 0.0
    for m in members:
        seed = _seed(es.seed, generation, m)
        a = clock()
        _perturb(model, seed, es.sigma)
        b = clock()
        out = model.generate(**enc, generation_config=gcfg)
        c = clock()
        comps = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        scored = [score_one(task, e, text, cfg.task.reward_timeout) for e, text in zip(batch, comps)]
        rewards[m] = np.mean([s.reward for s in scored]) if all(s.status == OK for s in scored) else 0.0
        d = clock()
        _perturb(model, seed, -es.sigma)
        t_noise += (b - a) + (clock() - d)
        t_decode += c - b
    r = np.nanmax(comm.allgather_floats(rewards), axis=0)  # each member's reward is on one rank
    z = (r - r.mean()) / (r.std() + 1e-8)
    a = clock()
    for p in model.parameters():
        update = torch.zeros_like(p)
        g = torch.Generator(device=p.device)
        for m in range(es.population):
            g.manual_seed(_seed(es.seed, generation, m))
            update.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=float(z[m]))
        p.data.add_(update, alpha=es.alpha / es.population)
    t_update = clock() - a
    total = float(comm.allgather_floats(np.array([clock() - t0]))[:, 0].max())
    return {"s_per_gen": total, "t_noise": t_noise, "t_decode": t_decode, "t_update": t_update}
