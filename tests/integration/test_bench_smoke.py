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
                  PYTHON=sys.executable)
    p = subprocess.run(["bash", "tools/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((out / "qwen2.5-tiny.json").read_text())
    for key in ("es_efficiency", "time_inference_s", "time_es_s", "breakdown_s", "breakdown_share", "noise",
                "peak_rss_es_bytes", "decode", "decode_tokens_per_s", "allgather_latency_s"):
        assert key in res, key
    assert 0 < res["es_efficiency"] < 10 and math.isfinite(res["time_es_s"])
    assert res["breakdown_s"]["t_update"] > 0, "the update must run (non-zero coefficients)"
    assert res["noise"]["normals_per_s"] > 0
    assert 0 < res["allgather_latency_s"] < 1
    assert abs(sum(res["breakdown_share"].values()) - 1) < 0.2
    assert "ES efficiency" in p.stdout and "Allgather alone" in p.stdout and "qwen2.5-tiny" in p.stdout
    png = tmp_path / "scale.png"
    s = subprocess.run([sys.executable, "tools/scale_model.py", str(out / "qwen2.5-tiny.json"), "--out", str(png)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    assert png.stat().st_size > 10_000 and "7B" in s.stdout
    bad = subprocess.run([sys.executable, "tools/scale_model.py", str(tmp_path / "nope.json")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope.json" in bad.stderr
