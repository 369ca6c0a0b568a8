"""The training paths under DDP: ``TokenWeightedTrainer`` and ``TokenPreferenceTrainer`` launched with
``accelerate launch`` as two CPU processes (gloo) give the same run as one process at the same global batch.

``ddp_train_script.py`` (beside this file; its docstring says why the two runs are the same computation) trains
both trainers for 4 SGD steps, once as a plain process with per-device batch 4 and once as 2 DDP processes with
per-device batch 2. Compared: the global batches (recorded, not assumed), the logged per-step loss, the final
parameters, and the replicas against each other.

Why ``--multi_gpu`` and not ``--cpu``: ``accelerate launch --cpu --num_processes 2`` (accelerate 1.16) runs the
script ONCE, as a single process, unless an MPI hostfile is given; ``--multi_gpu`` goes through torchrun and,
with no visible GPU, the processes form a gloo process group on the CPU. ``test_ddp_really_ran`` checks that two
processes ran DDP.

Tolerances (fp32 rounding, ``tests/tolerance.py``): the two runs evaluate the same formulas in other summation
orders (2 vs 4 rows per matmul, another padding per micro-batch, the gradient summed in one backward vs two
half-batch backwards averaged by an all-reduce). With ``lp = logprob_atol(max|logit|, d, V, depth=L+1)`` the
rounding of one per-token log-prob:

- loss of step 0 (same weights): ``A = S·lp + 4ε·√N·|L|``, with ``S`` the loss's sensitivity to one token's
  log-prob (TLDR: |∂(w·CE)/∂log p| = |w − CE·π·sin(πp)·p| ≤ 2 + π·max_p(−p·ln p·sin πp) < 3.12, a mean over
  tokens; DPO: β per scored token, ``S = β·n`` with ``n`` the most completion tokens of a pair) and the last term
  the rounding of the mean over ``N`` positions;
- step k adds the effect of the earlier updates' rounding (relative ``~ε·√N·depth`` of an update, whose first-order
  effect on the loss is the per-step loss change, O(1) here): at most one more ``A`` per step, ``(k+1)·A``;
- parameters after ``K`` SGD steps (θ ← θ − lr·g): ``4ε·(K·max|θ| + √N·(L+1)·Σ_k max|Δθ_k|)``: the rounding of
  each addition to θ, plus each gradient's relative rounding ``√N·depth·ε`` times the step's update.

What a bug changes is far above that: training each process on its own micro-batch (no gradient all-reduce,
what ``TokenPreferenceTrainer`` did) moved the replicas apart by 0.3 in the parameter sum and the step-1 DPO loss
by 0.02; the tests assert the loss curve moves by more than 100 times its tolerance, so a wrong update shows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.tolerance import EPS32, logprob_atol

SCRIPT = Path(__file__).resolve().parent / "ddp_train_script.py"
TRAINERS = ("weighted", "preference")
STEPS = 4
NPROC = 2
GLOBAL_BATCH = 4
TIMEOUT_S = 240
TLDR_SENSITIVITY = 2 + math.pi * 0.3550  # 0.3550 > max_p −p·ln p·sin(πp) = 0.35495 (at p ≈ 0.6)
SAFETY = 4.0

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def _launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, what: str) -> None:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish within {TIMEOUT_S} s\n{out[-4000:]}")
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}\n{out[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both trainers as one process (per-device batch 4) and as 2 DDP processes (per-device batch 2), run at the
    same time; returns ``{"one": (results, params_dir), "ddp": (...), "seconds": {...}}``."""
    root = tmp_path_factory.mktemp("ddp")
    one, ddp = root / "one", root / "ddp"
    one.mkdir()
    ddp.mkdir()
    common = ["--trainer", *TRAINERS, "--steps", str(STEPS)]
    t0 = time.perf_counter()
    p_one = _launch([sys.executable, str(SCRIPT), *common, "--per-device-batch", str(GLOBAL_BATCH),
                     "--out", str(one / "out.json"), "--params-dir", str(one)], one)
    p_ddp = _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(NPROC),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", "0",  # accelerate picks a free port
                     str(SCRIPT), *common, "--per-device-batch", str(GLOBAL_BATCH // NPROC),
                     "--workdir", str(ddp / "work"),  # one output_dir for both processes, as in a real run
                     "--out", str(ddp / "out.json"), "--params-dir", str(ddp)], ddp)
    _finish(p_one, "the single-process run")
    t_one = time.perf_counter() - t0
    _finish(p_ddp, "the accelerate launch run")
    t_all = time.perf_counter() - t0
    return {
        "one": (json.loads((one / "out.json").read_text()), one),
        "ddp": (json.loads((ddp / "out.json").read_text()), ddp),
        "work": ddp / "work",
        "seconds": {"one": t_one, "both": t_all},
    }


def test_ddp_really_ran(runs):
    """Two processes formed a gloo group and trained a DistributedDataParallel model; one plain process ran once."""
    one, _ = runs["one"]
    ddp, _ = runs["ddp"]
    for kind in TRAINERS:
        assert one[kind]["world_size"] == 1 and one[kind]["model_class"] == "LlamaForCausalLM"
        assert ddp[kind]["world_size"] == NPROC, "accelerate launch started one process, not DDP"
        assert ddp[kind]["backend"] == "gloo" and ddp[kind]["model_class"] == "DistributedDataParallel"
        assert one[kind]["steps"] == ddp[kind]["steps"] == STEPS
        assert one[kind]["global_batch"] == ddp[kind]["global_batch"] == GLOBAL_BATCH


@pytest.mark.parametrize("kind", TRAINERS)
def test_same_global_batches_and_equal_replicas(runs, kind):
    """Every step, the processes' micro-batches are disjoint and their union is the single process's batch; after
    training the replicas are bitwise equal (same all-reduced gradients, same SGD step on every process)."""
    one, ddp = runs["one"][0][kind], runs["ddp"][0][kind]
    assert len(one["batches"]) == STEPS and all(len(b) == GLOBAL_BATCH for b in one["batches"])
    assert sorted(i for b in one["batches"] for i in b) == list(range(STEPS * GLOBAL_BATCH))  # one epoch, no repeat
    for k in range(STEPS):
        parts = [set(rank[k]) for rank in ddp["rank_batches"]]
        assert all(len(p) == GLOBAL_BATCH // NPROC for p in parts)
        assert set.intersection(*parts) == set()
        assert sorted(set.union(*parts)) == one["batches"][k], f"step {k}: another global batch"
    sums = ddp["rank_param_sums"]
    assert len(sums) == NPROC and all(s == sums[0] for s in sums), f"DDP replicas differ: {sums}"


def _loss_tolerance(r: dict, kind: str) -> list[float]:
    lp = logprob_atol(r["logit_scale"], r["hidden"], r["vocab"], depth=r["n_layers"] + 1, safety=SAFETY)
    if kind == "weighted":
        sens = TLDR_SENSITIVITY  # a mean over tokens: one token's error, at most S·lp, bounds the mean's
    else:
        sens = r["beta"] * r["scored_per_item"]  # −log σ(β·h): |∂L/∂h| ≤ β, h sums n scored log-probs
    n = r["tokens_per_step"]
    return [(k + 1) * (sens * lp + SAFETY * EPS32 * math.sqrt(n) * abs(loss)) for k, loss in enumerate(r["losses"])]


@pytest.mark.parametrize("kind", TRAINERS)
def test_ddp_loss_curve_equals_one_process(runs, kind):
    one, ddp = runs["one"][0][kind], runs["ddp"][0][kind]
    tol = _loss_tolerance(one, kind)
    a, b = one["losses"], ddp["losses"]
    assert len(a) == len(b) == STEPS
    bad = [(k, a[k], b[k], tol[k]) for k in range(STEPS) if not abs(a[k] - b[k]) <= tol[k]]
    assert not bad, f"{kind}: (step, one process, DDP, tolerance) outside the tolerance: {bad}"
    # the test can fail: training moves the loss by far more than the tolerance, so a wrong update would show
    assert a[0] - a[-1] > 100 * max(tol), f"{kind}: the loss barely moved ({a}); the comparison would be blind"


@pytest.mark.parametrize("kind", TRAINERS)
def test_ddp_final_parameters_equal_one_process(runs, kind):
    (one, d_one), (_, d_ddp) = runs["one"], runs["ddp"]
    r = one[kind]
    p1, p2 = load_file(str(d_one / f"{kind}.safetensors")), load_file(str(d_ddp / f"{kind}.safetensors"))
    assert p1.keys() == p2.keys()
    atol = SAFETY * EPS32 * (
        STEPS * r["max_abs_param"]
        + math.sqrt(r["tokens_per_step"]) * (r["n_layers"] + 1) * sum(r["max_update_per_step"])
    )
    worst = max(float((p1[n] - p2[n]).abs().max()) for n in p1)
    assert worst <= atol, f"{kind}: max |θ_one − θ_ddp| = {worst:.3g} > {atol:.3g}"
    # the updates themselves are far above the tolerance (a missed or doubled step would not hide in it)
    assert min(r["max_update_per_step"]) > 100 * atol


def test_reference_cache_shared_by_the_processes(runs):
    """Both DDP processes built the preference reference cache into the one output_dir: one complete file, no
    temporary file left (each writer renames its own temporary file atomically)."""
    files = sorted(p.name for p in (runs["work"] / "preference" / "reference_cache").iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors"), files
