"""Quick modes of the benchmark scripts run and print their tables (no timing asserts)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_memory_quick(tmp_path):
    out = run("memory.py", "--params", "2e5", "--replicas", "2", "--modes", "mirrored",
              "stage2", "--steps", "1", "--plot", str(tmp_path / "m.png"))
    lines = [line for line in out.splitlines() if "stage2" in line]
    assert lines and "slots x0.500" in lines[0]


def test_memory_quick_stage3():
    # 400 x 400 = 160,000 weights: above the default persistence threshold.
    out = run("memory.py", "--hidden", "400", "--replicas", "2", "--modes", "mirrored",
              "stage3", "--steps", "1")
    line = [line for line in out.splitlines() if "stage3" in line][0]
    state = float(line.split("state x")[1].split()[0])
    assert 0.5 < state < 0.6, line  # biases and the 64x400 input layer stay replicated


def test_memory_quick_working_weights():
    # 400 x 400 weights: above the default persistence threshold, so they get
    # bfloat16 working copies at stage 2; the rest stays float32.
    out = run("memory.py", "--hidden", "400", "--replicas", "2", "--modes", "mirrored",
              "stage2", "--steps", "1", "--policy", "mixed_bfloat16")
    assert "policy mixed_bfloat16, param_dtype compute" in out
    mirrored, stage2 = ([line for line in out.splitlines() if mode in line][0]
                        for mode in (" mirrored", " stage2"))
    weights = [float(line.split()[3]) for line in (mirrored, stage2)]
    assert weights[1] < 0.7 * weights[0], (mirrored, stage2)  # 16-bit copies of most


def test_step_time_quick(tmp_path):
    out = run("step_time.py", "--params", "1e5", "--replicas", "2", "--epochs", "2",
              "--steps", "3", "--plot", str(tmp_path / "s.png"))
    assert "stage2: median step" in out and "stage3: median step" in out
    assert "CPU allocator: BFC" in out  # set by benchmarks/_common.py unless chosen
    ops = [int(line.split("traced ops")[1].split()[0].replace(",", "")) for line in out.splitlines()
           if "traced ops" in line]
    assert len(ops) == 4 and min(ops) > 0
    rss = [float(line.split("peak RSS")[1].split()[0]) for line in out.splitlines()
           if "peak RSS" in line]
    assert len(rss) == 4 and min(rss) > 100  # MiB, each mode's own process


def test_step_time_floor_quick():
    """`gradients`: the forward and backward pass alone, a smaller graph than
    MirroredStrategy's whole step (no reduction, no update)."""
    out = run("step_time.py", "--params", "1e5", "--replicas", "2", "--epochs", "2",
              "--steps", "3", "--modes", "mirrored", "gradients")
    ops = {line.split(":")[0].strip(): int(line.split("traced ops")[1].split()[0].replace(",", ""))
           for line in out.splitlines() if "traced ops" in line}
    assert set(ops) == {"mirrored", "gradients"}
    assert 0 < ops["gradients"] < ops["mirrored"] / 2, ops


def test_step_profile_quick():
    out = run("step_profile.py", "--model", "mlp", "--hidden", "400", "--replicas", "2",
              "--steps", "2", "--modes", "mirrored", "stage2", "stage3")
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and all(p.replace(".", "").isdigit() for p in parts[-3:]):
            rows[" ".join(parts[:-3])] = [float(v) for v in parts[-3:]]
    assert rows["matmul"][0] > 0 and rows["optimizer math"][0] > 0
    assert rows["zero publish"][1] > 0 and rows["zero reduce"][1] > 0  # the step's own copies
    assert rows["collectives: gather"][2] > 0  # stage 3 gathers its weights
    assert rows["zero publish"][0] == 0  # nothing of ZeRO under MirroredStrategy


def test_memory_whole_quick():
    out = run("memory.py", "--whole", "--replicas", "2", "--layers", "2", "--hidden-dim", "64",
              "--vocab", "256")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["adafactor"],
                                                                              ["muon"])]
    assert len(rows) == 2 and all(float(r[5]) < 1.1 for r in rows)  # x ideal


def test_depth_peak_quick():
    out = run("depth_peak.py", "--depths", "2", "4", "--width", "64")
    assert "recompute" in out and "no recompute" in out


@pytest.mark.parametrize("mode", ["stage2", "stage3"])
def test_max_model_quick(mode):
    out = run("max_model.py", "--budget-gib", "6", "--replicas", "2", "--steps", "0",
              "--start", "64", "--max-width", "128", "--modes", mode)
    assert f"{mode}: width 128" in out


def test_checkpoint_quick():
    out = run("checkpoint.py", "--params", "2e5", "--replicas", "2")
    lines = [line for line in out.splitlines() if "Checkpoint N=2" in line]
    assert [line.split()[0] for line in lines] == ["tf.train.Checkpoint", "tf_zero.Checkpoint"]
    for line in lines:
        assert "restored identical: True" in line and "save " in line and "restore " in line


def test_max_llm_quick():
    out = run("max_llm.py", "--modes", "stage3", "--replicas", "2", "--min-size", "1",
              "--max-size", "2", "--steps", "2", "--budget-gib", "10", timeout=600)
    line = [line for line in out.splitlines() if line.lstrip().startswith("stage3:")][-1]
    assert "k=2 (3 layers x 256)" in line and "peak RSS" in line, out
    assert '"finite": true' in out and "does not fit" not in out, out


def test_llama_1b_demo_refuses_mirrored_before_building():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "llama_1b.py"),
                        "--strategy", "mirrored"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    assert "1,011,959,808 parameters" in r.stdout
    assert "refused: --strategy mirrored needs about" in r.stderr
    assert "--force" in r.stderr and "parameters, built" not in r.stdout


def test_comm_volume_quick():
    """The tests' MLP (87 weights) as 2 workers x 2, every weight a working
    copy or sharded (persistence threshold 0): stages 1-2 move
    MirroredStrategy's gradient all-reduce plus one padding element; under
    mixed_bfloat16 they publish 16-bit working copies (92 padded elements at
    2 bytes instead of 4: -138 B) and stage 3 gathers in 16 bits; every
    figure explained to the byte."""
    out = run("comm_volume.py", "--models", "mlp_tiny", "--workers", "2",
              "--persistence-threshold", "0", "--policies", "float32", "mixed_bfloat16")
    tables, rows = {}, None
    for line in out.splitlines():
        if line.startswith("mlp_tiny, "):
            rows = tables.setdefault(line.split(",")[1].split(":")[0].strip(), {})
        elif line.split()[:1] in (["mirrored"], ["stage1"], ["stage2"], ["stage3"]):
            rows[line.split()[0]] = line.split()[1:6]  # measured, formula, ratio, inside, across
    float32, mixed = tables["float32"], tables["mixed_bfloat16"]
    assert float32["mirrored"][:2] == ["528", "522"], out  # + Keras' step counter copies
    assert mixed["mirrored"] == float32["mirrored"], out  # Keras' gradients stay float32
    for stage in ("stage1", "stage2"):
        assert float32[stage] == ["528", "522", "1.011", "176", "352"], out
        assert mixed[stage] == ["414", "522", "0.793", "138", "276"], out
    assert mixed["stage3"] == ["552", "783", "0.705", "184", "368"], out
    assert out.count("working copies published in 16 bits") == 2, out
    residuals = [line.split()[0] for line in out.splitlines() if line.endswith("residual")]
    assert residuals == ["+0"] * 8, out
