"""tokensmith.run under a real multi-process launch: ``accelerate launch --multi_gpu --num_processes 2`` on CPU.

On a CPU-only machine accelerate 1.x's ``--cpu`` flag runs its simple launcher (one process, or mpirun with a
hostfile); ``--multi_gpu`` starts the processes through torchrun, and :func:`tokensmith.run.default_state`
selects the gloo CPU backend. Each test starts real processes (~10 s each on two cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TEXTS = ["The sky is blue.", "Grass is green, mostly.", "Snow is white", "The sun is hot!", "Rain falls.",
         "A cat sat.", "Two dogs ran far away from home.", "Seven"]

SLOW_JOB = '''
import os, time
from dataclasses import dataclass
from tokensmith.run import Job, register_job

@register_job("test_slow")
@dataclass
class Slow(Job):
    delay: float = 0.2
    pid_dir: str = ""

    def required_columns(self):
        return ["x"]

    def setup(self, device):
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(self.pid_dir, f"pid-{rank}"), "w") as fh:
            fh.write(str(os.getpid()))

    def __call__(self, row):
        time.sleep(self.delay)
        return {"y": row["x"] ** 2}
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return env


def _launch(args: list[str], n: int = 2) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
            "-m", "tokensmith.cli", "run", *args]


def _single(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "tokensmith.cli", "run", *args]


def _results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _shard_ids(out: Path) -> list:
    return [json.loads(x)["id"] for p in sorted(out.glob("shard-*.jsonl")) for x in p.read_text().splitlines()
            if x.endswith("}")]


def test_two_processes_give_the_single_process_results(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = ["features", "--data", str(data), "--model", "tiny:llama", "--no-progress"]
    one = subprocess.run(_single([*common, "--out", str(tmp_path / "one")]), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_launch([*common, "--out", str(tmp_path / "two")]), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # both processes wrote: the rows were split 4 / 4, every id once
    assert sorted(len(p.read_text().splitlines()) for p in (tmp_path / "two").glob("shard-*.jsonl")) == [4, 4]
    a, b = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert [r["id"] for r in b] == list(range(len(TEXTS)))
    assert [r["result"] for r in a] == [r["result"] for r in b]  # identical, bit for bit (JSON floats)
    assert "computed 8" in two.stdout


def test_killing_a_process_mid_run_loses_and_duplicates_nothing(tmp_path):
    (tmp_path / "slowjob.py").write_text(SLOW_JOB)
    n = 24
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(n)))
    out = tmp_path / "out"
    args = ["test_slow", "--data", str(data), "--out", str(out), "--job-module", "slowjob", "--no-progress",
            "--set", f"pid_dir={tmp_path}"]
    proc = subprocess.Popen(_launch(args), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_shard_ids(out) if out.exists() else []) < 6:  # a few rows done by each process
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the launched run wrote nothing"
            time.sleep(0.1)
        os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0  # the launcher reports the dead worker (and stops the other one)
    before = _shard_ids(out)
    assert 6 <= len(before) < n and len(set(before)) == len(before)
    assert not (out / "results.jsonl").exists()
    with open(out / "shard-00000.jsonl", "a") as fh:  # and a row cut off mid-write, as a crash leaves it
        fh.write('{"id": 23, "index": 23, "row_')
    again = subprocess.run(_launch(args), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"computed {n - len(before)}" in again.stdout  # only the rows not finished before
    ids = _shard_ids(out)
    assert sorted(ids) == list(range(n))  # nothing lost, nothing duplicated, the torn line gone
    res = _results(out)
    assert [r["id"] for r in res] == list(range(n)) and [r["result"]["y"] for r in res] == [i * i for i in range(n)]
    for p in out.glob("shard-*.jsonl"):
        assert p.read_bytes().endswith(b"\n")
