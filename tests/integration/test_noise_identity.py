"""Issue 16 items 4, 6 and 7 on a real tiny CPU run (serial, in-process):
the noise fingerprint is recorded in the run log and every checkpoint,
`--resume` and `replay` refuse another one in one line naming both (and
accept it with --force), files from before the fingerprint are accepted
with a warning; the agreement check uses the master's integer fingerprint;
only the writing rank builds a checkpoint's state dicts and SHA-256."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from conftest import ROOT, cli_train, final_digest
from es_mpi import config
from es_mpi.cli import main
from es_mpi.engine.noise import NoiseSource
from es_mpi.engine.noise_id import fingerprint_of, fingerprint_short
from es_mpi.errors import RunAborted
from es_mpi.runs import checkpoint
from es_mpi.runs.rundir import RunOutput
from es_mpi.runs.runlog import read_log
from es_mpi.trainer import Trainer

TINY = str(ROOT / "configs" / "tiny.yaml")
SETS = ["es.generations=4", "checkpoint.every=2", "eval.limit=0"]
ARGS = ["--config", TINY, *[x for s in SETS for x in ("--set", s)]]
# what another device would have drawn: another block, another SM count
OTHER = {"block_sha256": "0badc0de" * 8, "device": "NVIDIA H100 80GB HBM3", "sm": 132, "torch": "2.9.0"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    from es_mpi.comm import serial

    d = tmp_path_factory.mktemp("noise-id") / "run"
    trainer = Trainer(config.load(TINY, SETS), serial(), d)
    assert trainer.run() == 0
    return d, trainer


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def snapshot(d: Path):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def set_fingerprint(path: Path, fp: dict | None) -> None:
    with h5py.File(path, "r+") as f:
        if fp is None:
            del f.attrs["noise_fingerprint"]      # as es-mpi wrote it before it recorded one
        else:
            f.attrs["noise_fingerprint"] = json.dumps(fp)


def the_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("es-mpi: error: "), err
    return lines[0]


def test_the_log_and_every_checkpoint_record_the_noise_fingerprint(tiny_run):
    run_dir, trainer = tiny_run
    mine = NoiseSource(1).fingerprint()
    assert trainer.noise_fp == mine
    assert fingerprint_of(read_log(run_dir / "log.h5")["attrs"]) == mine
    ckpts = checkpoint.list_complete(run_dir)
    assert [g for g, _ in ckpts] == [2, 4]
    for _, p in ckpts:
        assert fingerprint_of(checkpoint.load(p)["attrs"]) == mine
    code, out, err = cli("info", run_dir)
    assert code == 0, err
    assert f"noise        blake2b-block4194304, drawn as {fingerprint_short(mine)}" in out


def copy_with_fingerprint(tiny_run, tmp_path, fp, file: str = ""):
    """A copy of the tiny run whose `file` (default: the newest checkpoint)
    records `fp`: (run dir, that file)."""
    d = tmp_path / "run"
    shutil.copytree(tiny_run[0], d)
    target = d / file if file else checkpoint.latest(d)
    set_fingerprint(target, fp)
    return d, target


def test_resume_refuses_another_noise_in_one_line_and_force_accepts_it(tiny_run, tmp_path):
    d, newest = copy_with_fingerprint(tiny_run, tmp_path, OTHER)
    before = snapshot(d)
    code, out, err = cli_train(*ARGS, "--set", "es.generations=5", "--run-dir", str(d), "--resume")
    assert code == 2, (out[-2000:], err[-2000:])
    line = the_error(err)
    mine = fingerprint_short(NoiseSource(1).fingerprint())
    assert line == (f"es-mpi: error: --resume: {newest} was drawn with noise 0badc0de0bad (NVIDIA H100 80GB HBM3, "
                    f"132 SMs, torch 2.9.0), this device draws {mine}: the same seed gives other noise here "
                    "(pass --force to resume anyway)")
    assert snapshot(d) == before, "a refused resume wrote something"
    code, out, err = cli_train(*ARGS, "--set", "es.generations=5", "--run-dir", str(d), "--resume", "--force")
    assert code == 0, (out[-2000:], err[-2000:])
    assert "resumed at generation 4" in out and final_digest(out)
    assert "--force: resuming a run drawn with noise 0badc0de0bad" in out + err
    # from here the run records what it draws now
    assert fingerprint_of(checkpoint.load(checkpoint.latest(d))["attrs"]) == NoiseSource(1).fingerprint()


def test_resume_of_a_checkpoint_without_a_fingerprint_warns(tiny_run, tmp_path):
    d, newest = copy_with_fingerprint(tiny_run, tmp_path, None)
    code, out, err = cli_train(*ARGS, "--set", "es.generations=5", "--run-dir", str(d), "--resume")
    assert code == 0, (out[-2000:], err[-2000:])
    assert f"{newest} records no noise fingerprint" in out + err


def test_replay_refuses_another_noise_in_one_line_and_force_accepts_it(tiny_run, tmp_path):
    d, _ = copy_with_fingerprint(tiny_run, tmp_path, OTHER, "log.h5")
    code, _, err = cli("replay", d, "--generation", 2, "--out", tmp_path / "r.h5")
    assert code == 2
    mine = fingerprint_short(NoiseSource(1).fingerprint())
    assert the_error(err) == (f"es-mpi: error: {d / 'log.h5'}: the run drew its noise as 0badc0de0bad (NVIDIA H100 "
                              f"80GB HBM3, 132 SMs, torch 2.9.0), this device draws {mine}; its updates cannot be "
                              "replayed here (replay on the run's device type, or pass --force)")
    assert not (tmp_path / "r.h5").exists()
    # (the noise really is this device's here, so a forced replay gives the checkpoint's bits)
    code, out, err = cli("replay", d, "--generation", 2, "--out", tmp_path / "r.h5", "--force")
    assert code == 0, err
    assert "es-mpi: warning: --force: replaying a run drawn with noise 0badc0de0bad" in err
    rep, ck = checkpoint.load(tmp_path / "r.h5"), checkpoint.load(checkpoint.path_for(d, 2))
    assert rep["attrs"]["digest"] == ck["attrs"]["digest"]
    assert fingerprint_of(rep["attrs"]) == NoiseSource(1).fingerprint()


def test_replay_of_a_log_without_a_fingerprint_warns(tiny_run, tmp_path):
    d, _ = copy_with_fingerprint(tiny_run, tmp_path, None, "log.h5")
    code, out, err = cli("replay", d, "--generation", 1, "--out", tmp_path / "r.h5")
    assert code == 0, err
    assert f"es-mpi: warning: {d / 'log.h5'} records no noise fingerprint" in err


# -- item 6: agreement by the integer fingerprint --------------------------------
class FakeComm:
    """Rank `rank` of `size` whose collectives return plausible values: every
    other rank sent what this one did, or what `others` says."""

    def __init__(self, rank=1, size=2, others=None):
        self.rank, self.size, self.others = rank, size, others

    @property
    def is_root(self):
        return self.rank == 0

    def allgather_bytes(self, data, width):
        out = list(self.others) if self.others is not None else [data] * self.size
        out[self.rank] = data
        return out

    def allgather_json(self, obj):
        return [obj] * self.size

    def barrier(self):
        pass


def test_the_agreement_check_uses_the_integer_fingerprint_not_sha256(tiny_run, monkeypatch):
    _, trainer = tiny_run
    import es_mpi.engine.weights as weights_mod

    monkeypatch.setattr(weights_mod, "weights_digest", lambda *_: pytest.fail("SHA-256 in the agreement check"))
    monkeypatch.setattr(trainer, "comm", FakeComm(rank=1, size=2))
    trainer.weights.version += 1          # no cached digest to fall back on
    trainer.check_agreement(4)
    theirs = (trainer.weights.fingerprint() ^ 1).to_bytes(8, "little")
    monkeypatch.setattr(trainer, "comm", FakeComm(rank=1, size=3, others=[theirs, None, theirs]))
    with pytest.raises(RunAborted, match=r"^generation 4: master weights diverged across ranks: rank\(s\) 1 "
                                         r"differ from rank 0$"):
        trainer.check_agreement(4)


# -- item 7: only the writer builds a checkpoint -----------------------------------
@pytest.mark.parametrize("rank", [1, 0])
def test_only_the_writing_rank_builds_the_state_dicts_and_the_digest(tiny_run, tmp_path, monkeypatch, rank):
    _, trainer = tiny_run
    calls = []
    w, opt = trainer.weights, trainer.opt
    for obj, name in ((w, "state_dict"), (opt, "state_dict"), (w, "digest")):
        real = getattr(obj, name)
        monkeypatch.setattr(obj, name, lambda real=real, tag=f"{type(obj).__name__}.{name}": (calls.append(tag),
                                                                                              real())[1])
    comm = FakeComm(rank=rank, size=2)
    monkeypatch.setattr(trainer, "comm", comm)
    monkeypatch.setattr(trainer, "out", RunOutput(comm, tmp_path / "run"))
    trainer.save(7)
    written = checkpoint.path_for(tmp_path / "run", 7)
    if rank:
        assert calls == [] and not written.exists()
    else:
        assert sorted(calls) == sorted(["Weights.state_dict", f"{type(opt).__name__}.state_dict", "Weights.digest"])
        ck = checkpoint.load(written)
        assert ck["attrs"]["digest"] == w.digest() and fingerprint_of(ck["attrs"]) == trainer.noise_fp
