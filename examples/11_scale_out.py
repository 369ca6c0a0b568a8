# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Dataset-level jobs with `tokensmith.run`: sharded, resumable, merged in order
#
# `tokensmith.run.run(job, dataset, out)` runs a per-example job (attribution, GCG, tokenizer report, analysis
# features, reference log-probs, or your own `Job` subclass) over a `datasets.Dataset`, writes one fsynced
# record per example, resumes where it stopped, and — launched with `accelerate launch` — shards the rows
# across processes, GPUs and nodes. This notebook runs a job in-process, interrupts and resumes it, writes a
# custom job, and launches the same command with two processes, checking the output is identical.

# %%
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import torch

import tokensmith as ts
from tokensmith.run import Job, register_job, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the launched processes below run 1 thread each: same kernels, bit-identical results
work = Path(tempfile.mkdtemp(prefix="tokensmith_run_"))
ds = datasets.Dataset.from_dict({
    "uid": ["sky", "grass", "snow", "sun", "coal", "blood"],
    "prompt": ["The sky is", "Grass is", "Snow is", "The sun is", "Coal is", "Blood is"],
    "target": [" blue", " green", " white", " hot", " black", " red"],
})

# %% [markdown]
# ## 1. One process: attribution over a dataset
# A job given by name takes its options as `config`; an already-loaded adapter can be passed as `adapter`.
# The output directory holds a manifest (`run.json`: job, config hash, ids), one shard per process and the
# merged `results.jsonl` in input order.

# %%
ad = ts.tiny("llama")
cfg = {"adapter": ad, "method": "input_x_gradient"}
res = run("attribute", ds, work / "attr", config=cfg, id_column="uid", progress=False)
print(res.computed, "computed;", sorted(p.name for p in (work / "attr").iterdir()))
first = res[0]["attribution"]
print(res.ids[0], first["tokens"], [round(x, 3) for x in first["scores"][0]])

# %% [markdown]
# ## 2. Resume: finished ids are skipped, a torn last line is dropped
# Simulate a crash that cut off the last record mid-write; the next call recomputes only that row.

# %%
shard = work / "attr" / "shard-00000.jsonl"
raw = shard.read_bytes()
shard.write_bytes(raw[: raw.rfind(b"\n", 0, len(raw) - 1) + 1] + b'{"id": "blood", "ind')
again = run("attribute", ds, work / "attr", config=cfg, id_column="uid", progress=False)
print("recomputed", again.computed, "row(s); results unchanged:", again.results == res.results)
assert again.computed == 1 and again.results == res.results

# %% [markdown]
# A directory is only resumed by the same job with the same config on the same ids; anything else is refused
# with what differs (or cleared with `overwrite=True`):

# %%
try:
    run("attribute", ds, work / "attr", config={**cfg, "method": "saliency"}, id_column="uid", progress=False)
except ValueError as e:
    print("refused:", str(e)[:160], "...")

# %% [markdown]
# ## 3. Your own job
# A job is a dataclass: its fields are the config, `required_columns()` the columns it reads, `setup(device)`
# runs once per process, `__call__(row)` returns a JSON-serialisable dict. Registered, it is also a CLI job
# (`tokensmith run answer_logprob --job-module mymodule ...`).

# %%
from dataclasses import dataclass, field  # noqa: E402


@register_job("answer_logprob")
@dataclass
class AnswerLogprob(Job):
    model: str = "tiny:llama"
    adapter: object = field(default=None, repr=False, metadata={"config": False})

    def required_columns(self):
        return ["prompt", "target"]

    def setup(self, device):
        self.adapter = self.adapter or ts.tiny(self.model.split(":")[1])

    def __call__(self, row):
        enc = self.adapter.encode(row["prompt"], target=row["target"])
        lp = self.adapter.token_logprobs(enc)
        return {"logprob": float(lp.sum()), "tokens": int(enc.target_mask.sum())}


mine = run(AnswerLogprob(adapter=ad), ds, work / "custom", progress=False)
print(mine.to_pandas())

# %% [markdown]
# ## 4. The same job with two processes
# `tokensmith run <job>` is the CLI of `run`; under `accelerate launch` it shards the pending rows across the
# processes (contiguous, disjoint) and merges the shards in input order. On a CPU-only machine pass
# `--multi_gpu` (torchrun starts the processes, tokensmith selects the gloo CPU backend); on GPUs the same
# command spreads the rows over the devices. Each row is computed on its own, so with the same number of
# threads per process the results are bit-identical to the in-process run (a different thread count may change
# the last bits of fp32 reductions).

# %%
data = work / "rows.jsonl"
data.write_text("".join(json.dumps(r) + "\n" for r in ds.to_list()))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
args = ["run", "attribute", "--data", str(data), "--out", str(work / "two"), "--model", "tiny:llama",
        "--id-column", "uid", "--set", "method=input_x_gradient", "--no-progress"]
launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(port), "-m", "tokensmith.cli", *args]
proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
print(proc.stdout.strip()[-300:])
assert proc.returncode == 0, proc.stderr[-2000:]
two = [json.loads(x) for x in (work / "two" / "results.jsonl").read_text().splitlines()]
print("shards:", {p.name: len(p.read_text().splitlines()) for p in sorted((work / "two").glob("shard-*"))})
same = [r["result"] for r in two] == res.results
print("identical to the in-process run:", same)
assert same and [r["id"] for r in two] == ds["uid"]
