"""`model.dtype: auto`: bf16 on GPU and on CPUs with native bf16 matrix
instructions, else whatever a short timed probe finds faster (bf16 only with
a clear margin), and the reason is said."""
import torch

from es_mpi import dtypes


def test_cpu_flags_decide_when_present(monkeypatch):
    monkeypatch.setattr(dtypes, "probe_seconds", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no probe")))
    assert dtypes.choose("auto", "cpu", {"avx2", "avx512_bf16"}) == ("bf16", "auto: CPU has avx512_bf16")
    assert dtypes.choose("auto", "cpu", {"amx_bf16", "avx512_bf16"})[0] == "bf16"


def test_probe_decides_without_flags(monkeypatch):
    times = {torch.float32: 1.0, torch.bfloat16: 2.0}
    monkeypatch.setattr(dtypes, "probe_seconds", lambda dt, *a, **k: times[dt])
    dt, why = dtypes.choose("auto", "cpu", {"avx2"})
    assert dt == "fp32" and "no native bf16" in why and "0.50x" in why
    times[torch.bfloat16] = 0.9          # 1.11x faster: inside the noise margin, stays fp32
    assert dtypes.choose("auto", "cpu", set())[0] == "fp32"
    times[torch.bfloat16] = 0.5          # 2x faster: bf16
    dt, why = dtypes.choose("auto", "cpu", set())
    assert dt == "bf16" and "2.00x faster" in why


def test_gpu_and_explicit_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dtypes.choose("auto", "cuda:0")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dtypes.choose("auto", "cuda:0")[0] == "fp16"
    assert dtypes.choose("fp32", "cuda:0") == ("fp32", "as configured")


def test_the_probe_really_times_both(monkeypatch):
    assert dtypes.probe_seconds(torch.float32, rows=4, dim=64, reps=2) > 0
    assert dtypes.probe_seconds(torch.bfloat16, rows=4, dim=64, reps=2) > 0


def test_emulated_bf16_on_an_old_gpu_picks_fp16(monkeypatch):
    """A V100 / T4 'supports' bf16 only by emulation: auto must not count it."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert dtypes.choose("auto", "cuda:0")[0] == "fp16"
