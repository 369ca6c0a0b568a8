"""tokensmith.run — dataset-level jobs across processes, GPUs and nodes, on ``accelerate`` and ``datasets``.

:func:`run` takes a dataset and a per-example :class:`Job` (attribution, GCG, tokenizer report, analysis
features, reference log-probs, or your own subclass), shards the pending rows across the processes of
``accelerate launch`` (one process without it), writes one fsynced JSON Lines record per example to a
per-process shard, resumes on restart (finished ids skipped, a torn last line never counted), and merges
the shards in input order. The output directory's manifest (job, config hash, dataset fingerprint) refuses
results of another job or config.

    accelerate launch --multi_gpu --num_processes 2 -m tokensmith.cli run attribute --data rows.jsonl --out out/ \\
        --model tiny:llama --set method=saliency

(On a CPU-only machine ``--multi_gpu`` starts the processes through torchrun and tokensmith selects accelerate's
``gloo`` CPU backend; ``accelerate launch --cpu`` starts a single process unless given an MPI hostfile.)

Examples:
    >>> import tempfile, datasets
    >>> from tokensmith.run import run
    >>> ds = datasets.Dataset.from_dict({"text": ["Hello world", "The sky is blue"]})
    >>> res = run("features", ds, tempfile.mkdtemp(), config={"model": "tiny:llama"}, progress=False)
    >>> len(res), len(res[0]["logprob"]) == len(res[0]["input_ids"]) - 1
    (2, True)
"""

from tokensmith.run import cli  # noqa: F401  (registers `tokensmith run`)
from tokensmith.run.jobs import (
    AttributeJob,
    FeaturesJob,
    GCGJob,
    Job,
    LogprobsJob,
    ModelJob,
    TokenizerReportJob,
    available_jobs,
    get_job,
    register_job,
)
from tokensmith.run.runner import RunResult, load_rows, run
from tokensmith.run.store import config_hash, read_jsonl

__all__ = [
    "AttributeJob",
    "FeaturesJob",
    "GCGJob",
    "Job",
    "LogprobsJob",
    "ModelJob",
    "RunResult",
    "TokenizerReportJob",
    "available_jobs",
    "config_hash",
    "get_job",
    "load_rows",
    "read_jsonl",
    "register_job",
    "run",
]
