"""Per-example jobs for :func:`tokensmith.run.run`: a small dataclass per job, one ``__call__(row) -> dict``.

A :class:`Job` is a dataclass whose fields are its configuration (hashed into the run's manifest, so a
directory is only resumed by the same job with the same config), with

- ``required_columns()`` — the dataset columns it reads (checked before anything runs);
- ``setup(device)`` — once per process: load the model onto this process' device;
- ``__call__(row) -> dict`` — one example; the returned dict must be JSON-serialisable (it is the record's
  ``"result"``).

Fields declared with ``field(..., metadata={"config": False})`` (an already-loaded adapter, a progress flag)
are not part of the config. Jobs are registered by name (:func:`register_job`) so the CLI
(``tokensmith run <job>``) and ``accelerate launch -m tokensmith.cli run <job>`` find them:

| name | job | reads | writes per example |
| --- | --- | --- | --- |
| ``attribute`` | :class:`AttributeJob` | prompt, target | ``{"attribution": AttributionResult.to_dict(), "metrics": ...}`` |
| ``gcg`` | :class:`GCGJob` | goal, target | ``SearchResult.to_dict()`` |
| ``tokenizer_report`` | :class:`TokenizerReportJob` | text | per tokenizer: tokens, bytes, characters, words |
| ``features`` | :class:`FeaturesJob` | text | ``next_token_features`` of the text (log-prob, entropy, rank, max-prob) |
| ``logprobs`` | :class:`LogprobsJob` | prompt, chosen, rejected | summed reference log-probs and token counts |

Examples:
    >>> from tokensmith.run.jobs import available_jobs, get_job
    >>> {"attribute", "features", "gcg", "logprobs", "tokenizer_report"} <= set(available_jobs())
    True
    >>> job = get_job("features", model="tiny:llama", text_column="text")
    >>> job.required_columns(), sorted(job.config())[:3]
    (['text'], ['batch_size', 'max_length', 'model'])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = [
    "AttributeJob",
    "FeaturesJob",
    "GCGJob",
    "Job",
    "LogprobsJob",
    "ModelJob",
    "TokenizerReportJob",
    "available_jobs",
    "get_job",
    "register_job",
]

_JOBS: dict[str, type[Job]] = {}


def register_job(name: str):
    """Class decorator: register a :class:`Job` subclass under ``name`` (its ``Job.name``)."""

    def deco(cls: type[Job]) -> type[Job]:
        if not (isinstance(cls, type) and issubclass(cls, Job)):
            raise TypeError(f"register_job({name!r}) decorates Job subclasses, got {cls!r}")
        cls.name = name
        _JOBS[name] = cls
        return cls

    return deco


def available_jobs() -> list[str]:
    """The registered job names."""
    return sorted(_JOBS)


def get_job(name: str, **config: Any) -> Job:
    """An instance of the job registered as ``name`` with ``config`` (unknown keys raise a TypeError)."""
    if name not in _JOBS:
        raise ValueError(f"unknown job {name!r}; registered jobs: {available_jobs()}")
    cls = _JOBS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(config) - known)
    if bad:
        raise TypeError(f"job {name!r} has no option(s) {bad}; options: {sorted(known)}")
    return cls(**config)


def _not_config() -> dict[str, bool]:
    return {"config": False}


@dataclass
class Job:
    """Base class of per-example jobs (module docstring). Subclasses are dataclasses."""

    name: ClassVar[str] = "job"

    def required_columns(self) -> list[str]:
        """The dataset columns ``__call__`` reads."""
        return []

    def config(self) -> dict[str, Any]:
        """The fields that define the results (hashed into the manifest)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("config", True)}

    def setup(self, device: torch.device) -> None:
        """Called once per process before the first row (load models here)."""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class ModelJob(Job):
    """A job on one model: ``model`` names it (``tiny:<arch>``, a bundled name, a local directory or a hub id);
    an already-loaded ``adapter`` may be passed instead (then ``model`` defaults to its name)."""

    model: str = ""
    adapter: Any = field(default=None, repr=False, metadata=_not_config())

    def __post_init__(self) -> None:
        if not self.model:
            if self.adapter is None:
                raise ValueError(f"job {self.name!r} needs model= (a model name or directory) or adapter=")
            self.model = str(getattr(self.adapter, "name", "adapter"))

    def setup(self, device: torch.device) -> None:
        if self.adapter is None:
            from tokensmith.report import load_model

            self.adapter = load_model(self.model)
        want, have = torch.device(device), self.adapter.device
        same = want.type == have.type and (want.type == "cpu" or want.index == have.index)
        if not same and not hasattr(self.adapter.model, "hf_device_map"):  # a dispatched model stays where it is
            self.adapter.model.to(want)


@register_job("attribute")
@dataclass
class AttributeJob(ModelJob):
    """:func:`tokensmith.attribution.attribute` of ``row[target_column]`` given ``row[input_column]``.

    ``kwargs`` go to every ``attribute`` call (``chat``, ``n_steps``, ...); ``metrics`` are
    :func:`tokensmith.attribution.evaluate` metrics stored with each result.
    """

    method: Any = "integrated_gradients"
    input_column: str = "prompt"
    target_column: str | None = "target"
    metrics: list[str] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    row_kwargs: Any = field(default=None, repr=False, metadata=_not_config())

    def required_columns(self) -> list[str]:
        return [c for c in (self.input_column, self.target_column) if c is not None]

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        m = self.method
        if not isinstance(m, str):  # a method class or instance: its class path and (dataclass) fields
            cls = m if isinstance(m, type) else type(m)
            fields = dataclasses.asdict(m) if dataclasses.is_dataclass(m) and not isinstance(m, type) else {}
            cfg["method"] = {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
        return cfg

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from tokensmith.attribution import attribute, evaluate

        kw = dict(self.kwargs)
        if self.row_kwargs is not None:
            kw.update(self.row_kwargs(row))
        if self.target_column is not None:
            kw["target"] = row[self.target_column]
        res = attribute(self.adapter, row[self.input_column], method=self.method, progress=None, **kw)
        out: dict[str, Any] = {"attribution": res.to_dict()}
        if self.metrics:
            ev = evaluate(self.adapter, res, metrics=self.metrics)
            out["metrics"] = {k: float(v) for k, v in ev.items() if k != "per_row"}
        return out


@register_job("gcg")
@dataclass
class GCGJob(ModelJob):
    """:func:`tokensmith.optimization.gcg` on each behaviour (``goal``, ``target`` columns, AdvBench's CSV).

    ``kwargs`` go to every ``gcg`` call (``steps``, ``search_width``, ``topk``, ``suffix``, ...). Every row uses
    the same ``seed``, so a row's result does not depend on which process ran it.
    """

    goal_column: str = "goal"
    target_column: str = "target"
    seed: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def required_columns(self) -> list[str]:
        return [self.goal_column, self.target_column]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from tokensmith.optimization import gcg

        kw = {"progress": False, **self.kwargs}
        res = gcg(self.adapter, row[self.goal_column], row[self.target_column], seed=self.seed, **kw)
        return res.to_dict()


@register_job("features")
@dataclass
class FeaturesJob(ModelJob):
    """:func:`tokensmith.analysis.next_token_features` of one text per row (log-prob, entropy, rank, max-prob)."""

    text_column: str = "text"
    max_length: int | None = None
    batch_size: int = 1

    def required_columns(self) -> list[str]:
        return [self.text_column]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from tokensmith.analysis import next_token_features

        ds = next_token_features(self.adapter, [row[self.text_column]], max_length=self.max_length, progress=False)
        rec = ds[0]
        rec.pop("text_index", None)
        return rec


@register_job("logprobs")
@dataclass
class LogprobsJob(ModelJob):
    """Reference log-probs of a preference pair: ``Σ_t log π(y_t | x, y_<t)`` of the chosen and the rejected
    completion (:func:`tokensmith.alignment.pair_logprobs`, prompt and completion encoded jointly), the inputs of
    DPO-family losses computed once with the reference model."""

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    chat: bool | None = None

    def required_columns(self) -> list[str]:
        return [self.prompt_column, self.chosen_column, self.rejected_column]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from tokensmith.alignment import encode_pairs, pair_logprobs

        pair = {"prompt": row[self.prompt_column], "chosen": row[self.chosen_column],
                "rejected": row[self.rejected_column]}
        pb = encode_pairs(self.adapter, [pair], chat=self.chat)
        with torch.no_grad():
            lp_c, lp_r = pair_logprobs(self.adapter, pb)
        mc, mr = pb.mask_w, pb.mask_l
        return {
            "chosen_logp": float(lp_c.double().sum()),  # 0 outside the completion masks
            "rejected_logp": float(lp_r.double().sum()),
            "chosen_tokens": int(mc.sum()),
            "rejected_tokens": int(mr.sum()),
        }


@register_job("tokenizer_report")
@dataclass
class TokenizerReportJob(Job):
    """Per text, for each tokenizer (bundled names of :func:`tokensmith.tokenization.load_tokenizer`): tokens,
    UTF-8 bytes, characters and whitespace words — the per-example counts behind fertility, compression and
    tokenization premium, aggregated with :func:`tokensmith.tokenization.corpus_metrics` or pandas."""

    tokenizers: list[str] = field(default_factory=lambda: ["smollm2"])
    text_column: str = "text"
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False, metadata=_not_config())

    def required_columns(self) -> list[str]:
        return [self.text_column]

    def setup(self, device: torch.device) -> None:
        from tokensmith.tokenization import load_tokenizer

        for name in self.tokenizers:
            if name not in self._loaded:
                self._loaded[name] = load_tokenizer(name)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        text = row[self.text_column]
        if not isinstance(text, str):
            raise TypeError(f"column {self.text_column!r} must hold strings, got {type(text).__name__}")
        out: dict[str, Any] = {"bytes": len(text.encode("utf-8")), "chars": len(text), "words": len(text.split())}
        out["tokens"] = {
            name: len(tok(text, add_special_tokens=False)["input_ids"]) for name, tok in self._loaded.items()
        }
        return out
