"""The bench runs on a tiny model and writes valid JSON (through the GPU-check
script, on a CPU-sized Qwen2 shape), and the scale model reads that JSON.
Speed itself is never asserted here: timings on these machines are noisy."""
import json
import math
import subprocess
import sys

from conftest import ROOT, run_env


def test_gpu_check_script_and_scale_model_on_tiny_shape(tmp_path, cache_dir):
    out = tmp_path / "gc"
    env = run_env(ES_MPI_CACHE=str(cache_dir), SHAPES="qwen2.5-tiny", PROMPTS="4", TOKENS="8",
                  PREFLIGHT_SHAPE="qwen2.5-tiny", BACKENDS="hf", PYTHON=sys.executable)
    p = subprocess.run(["bash", "tools/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for noise in ("full", "lowrank"):
        check_bench_json(json.loads((out / f"qwen2.5-tiny-{noise}-hf.json").read_text()), noise)
    pre = json.loads((out / "preflight.json").read_text())
    assert pre["transformers_supported"] and pre["decode_two_rows"] == "ok" and not pre["failures"]
    assert "preflight torch:" in p.stdout and "preflight transformers:" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"qwen2.5-tiny-full-hf", "qwen2.5-tiny-lowrank-hf"}
    assert "ES efficiency" in p.stdout and "Allgather alone" in p.stdout and "qwen2.5-tiny" in p.stdout
    # the master-on-host comparison ran both trains (on CPU both keep the master in host memory)
    assert "master host == device: same final digest" in (out / "master_host.txt").read_text()
    # the script ends with the scale model over both kinds
    assert (out / "scale_model.png").stat().st_size > 10_000
    table = (out / "scale_model.txt").read_text()
    assert all(f"{n} {m}" in " ".join(table.split()) for n in ("full", "lowrank") for m in ("0.5B", "7B"))
    png = tmp_path / "scale.png"
    s = subprocess.run([sys.executable, "tools/scale_model.py", str(out / "qwen2.5-tiny-full-hf.json"), "--out", str(png)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    assert png.stat().st_size > 10_000 and "7B" in s.stdout and "lowrank" not in s.stdout
    bad = subprocess.run([sys.executable, "tools/scale_model.py", str(tmp_path / "nope.json")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope.json" in bad.stderr
    twice = subprocess.run([sys.executable, "tools/scale_model.py", *[str(out / "qwen2.5-tiny-full-hf.json")] * 2],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert twice.returncode == 2 and "one bench JSON per noise kind" in twice.stderr


def check_bench_json(res, noise):
    assert res["config"]["es"]["noise"] == noise
    for key in ("es_efficiency", "time_inference_s", "time_es_s", "breakdown_s", "breakdown_share", "noise",
                "peak_rss_es_bytes", "decode", "decode_tokens_per_s", "allgather_latency_s"):
        assert key in res, key
    assert 0 < res["es_efficiency"] < 10 and math.isfinite(res["time_es_s"])
    assert res["breakdown_s"]["t_update"] > 0, "the update must run (non-zero coefficients)"
    assert res["noise"]["normals_per_s"] > 0
    if noise == "lowrank":  # every row of the rank in one batch
        assert res["tiles_per_rank"] == 1 and res["rows_per_rank"] == res["members_per_rank"] * 4
    assert 0 < res["allgather_latency_s"] < 1
    assert abs(sum(res["breakdown_share"].values()) - 1) < 0.2


def test_bench_times_the_update_at_other_populations(tmp_path, cache_dir):
    js = tmp_path / "b.json"
    env = run_env(ES_MPI_CACHE=str(cache_dir))
    p = subprocess.run([sys.executable, "-m", "es_mpi", "bench", "--config", "configs/tiny.yaml", "--set",
                        "es.noise=lowrank", "--update-n", "4,16", "--json", str(js)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(js.read_text())
    assert list(res["update_s_by_population"]) == ["4", "16"]
    assert all(t > 0 for t in res["update_s_by_population"].values())
    assert "update s at N = 16 (lowrank)" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "es_mpi", "bench", "--config", "configs/tiny.yaml",
                          "--update-n", "4,x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--update-n '4,x'" in bad.stderr
