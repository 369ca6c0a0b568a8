"""tokensmith.run in one process: results equal direct calls, resume, torn writes, refusing foreign outputs."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import datasets
import pytest
import torch

import tokensmith as ts
from tokensmith.run import Job, config_hash, read_jsonl, register_job, run
from tokensmith.run.store import collect, shard_path

TEXTS = ["The sky is blue.", "Grass is green, mostly.", "Snow is white", "The sun is hot!", "Rain falls."]


@pytest.fixture
def ds():
    return datasets.Dataset.from_dict({"uid": [f"u{i}" for i in range(len(TEXTS))], "text": TEXTS})


@register_job("test_square")
class SquareJob(Job):
    """A deterministic toy job: len(text)**2; raises on a chosen text; counts its calls."""

    crash_on: str | None = None
    calls: list | None = None

    def __init__(self, crash_on=None, calls=None):
        self.crash_on, self.calls = crash_on, calls

    def config(self):
        return {}

    def required_columns(self):
        return ["text"]

    def __call__(self, row):
        if self.calls is not None:
            self.calls.append(row["text"])
        if row["text"] == self.crash_on:
            raise RuntimeError("boom")
        return {"n2": len(row["text"]) ** 2}


class FakeState:
    """A PartialState stand-in: process ``rank`` of ``world`` (barriers are no-ops; used for layout checks)."""

    def __init__(self, rank=0, world=1):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = "cpu"

    def wait_for_everyone(self):
        pass

    def split_between_processes(self, items):
        n = len(items)
        k, r = divmod(n, self.num_processes)
        lo = self.process_index * k + min(self.process_index, r)
        hi = lo + k + (1 if self.process_index < r else 0)
        return nullcontext(items[lo:hi])


def test_features_job_equals_next_token_features(ds, tmp_path, shared_tiny, torch_one_thread):
    from tokensmith.analysis import next_token_features

    ad = shared_tiny("llama")
    res = run("features", ds, tmp_path / "out", config={"adapter": ad}, progress=False)
    ref = next_token_features(ad, TEXTS, progress=False)
    assert res.ids == list(range(len(TEXTS))) and res.computed == len(TEXTS) and not res.errors
    for r, want in zip(res.results, ref, strict=True):
        assert r["input_ids"] == want["input_ids"]
        for col in ("logprob", "entropy", "max_prob"):  # one text per forward vs a padded batch: fp32 rounding
            assert torch.allclose(torch.tensor(r[col]), torch.tensor(want[col]), atol=1e-4), col
        assert r["rank"] == want["rank"] or max(abs(a - b) for a, b in zip(r["rank"], want["rank"], strict=True)) <= 1
    merged = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [m["index"] for m in merged] == list(range(len(TEXTS)))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["job"] == "features"


def test_resume_after_a_crash_computes_only_the_rest(ds, tmp_path):
    out = tmp_path / "out"
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        run(SquareJob(crash_on=TEXTS[2], calls=calls), ds, out, id_column="uid", progress=False)
    assert [r["id"] for r in read_jsonl(shard_path(out, 0))] == ["u0", "u1"]
    assert not (out / "results.jsonl").exists()  # nothing merged while rows are missing
    calls.clear()
    res = run(SquareJob(calls=calls), ds, out, id_column="uid", progress=False)
    assert calls == TEXTS[2:] and res.computed == 3
    assert [r["n2"] for r in res.results] == [len(t) ** 2 for t in TEXTS]
    again = run(SquareJob(calls=calls), ds, out, id_column="uid", progress=False)
    assert again.computed == 0 and again.results == res.results


def test_torn_last_line_is_dropped_and_recomputed(ds, tmp_path):
    out = tmp_path / "out"
    run(SquareJob(), ds, out, progress=False)
    shard = shard_path(out, 0)
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:3]) + lines[3][:7])  # killed mid-write of row 3, row 4 never started
    assert sorted(collect(out)) == [0, 1, 2]
    res = run(SquareJob(), ds, out, progress=False)
    assert res.computed == 2
    assert [json.loads(x)["id"] for x in shard.read_bytes().splitlines()] == [0, 1, 2, 3, 4]  # no torn bytes left


def test_shards_of_several_processes_are_merged_in_input_order(ds, tmp_path):
    out = tmp_path / "out"
    # process 0 of 2 takes the first half of the pending rows [0, 1, 2]; a later process 1 of 2 (which here sees
    # those as done) takes the second half of what is left [3, 4] -> [4]; row 3 stays pending
    run(SquareJob(), ds, out, progress=False, state=FakeState(0, 2))
    run(SquareJob(), ds, out, progress=False, state=FakeState(1, 2))
    assert [r["id"] for r in read_jsonl(shard_path(out, 0))] == [0, 1, 2]
    assert [r["id"] for r in read_jsonl(shard_path(out, 1))] == [4]
    assert not (out / "results.jsonl").exists()
    res = run(SquareJob(), ds, out, progress=False, state=FakeState(0, 3))  # resumed with another world size
    assert res.computed == 1 and [r["n2"] for r in res.results] == [len(t) ** 2 for t in TEXTS]
    merged = [json.loads(x)["id"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert merged == list(range(len(TEXTS)))


def test_a_duplicate_result_across_shards_raises(ds, tmp_path):
    out = tmp_path / "out"
    run(SquareJob(), ds, out, progress=False)
    rec = read_jsonl(shard_path(out, 0))[0]
    shard_path(out, 1).write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="has records in both"):
        run(SquareJob(), ds, out, progress=False)


def test_errors_are_recorded_then_retried_and_superseded(ds, tmp_path):
    out = tmp_path / "out"
    res = run(SquareJob(crash_on=TEXTS[1]), ds, out, on_error="record", progress=False)
    assert res.results[1] is None and res.errors == {1: "RuntimeError: boom"}
    assert run(SquareJob(), ds, out, progress=False).computed == 0  # a failed row is finished unless asked
    fixed = run(SquareJob(), ds, out, retry_errors=True, progress=False, state=FakeState(0, 1))
    assert fixed.computed == 1 and not fixed.errors and fixed.results[1] == {"n2": len(TEXTS[1]) ** 2}


def test_another_job_config_or_dataset_is_refused(ds, tmp_path, shared_tiny):
    out = tmp_path / "out"
    ad = shared_tiny("llama")
    run("tokenizer_report", ds, out, config={"tokenizers": ["smollm2"]}, progress=False)
    with pytest.raises(ValueError, match="config differs in tokenizers"):
        run("tokenizer_report", ds, out, config={"tokenizers": ["minilm"]}, progress=False)
    with pytest.raises(ValueError, match="holds results of job 'tokenizer_report', not 'features'"):
        run("features", ds, out, config={"adapter": ad}, progress=False)
    with pytest.raises(ValueError, match="another dataset"):
        run("tokenizer_report", ds.select(range(3)), out, config={"tokenizers": ["smollm2"]}, progress=False)
    changed = ds.map(lambda r: {"text": r["text"].upper()})
    with pytest.raises(ValueError, match="changed since their results"):
        run("tokenizer_report", changed, out, config={"tokenizers": ["smollm2"]}, progress=False)
    res = run("tokenizer_report", changed, out, config={"tokenizers": ["minilm"]}, overwrite=True, progress=False)
    assert res.computed == len(TEXTS) and set(res.results[0]["tokens"]) == {"minilm"}
    assert len(read_jsonl(shard_path(out, 0))) == len(TEXTS)  # the old records are gone


def test_bad_input_says_what_to_do(ds, tmp_path):
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt', 'target'\] needed by job 'attribute'"):
        run("attribute", ds, tmp_path / "a", config={"model": "tiny:llama"}, progress=False)
    dup = datasets.Dataset.from_dict({"uid": ["a", "a"], "text": ["x", "y"]})
    with pytest.raises(ValueError, match="duplicate"):
        run(SquareJob(), dup, tmp_path / "b", id_column="uid", progress=False)
    with pytest.raises(ValueError, match="unknown job 'nope'"):
        run("nope", ds, tmp_path / "c")
    with pytest.raises(TypeError, match="has no option"):
        run("features", ds, tmp_path / "c", config={"modle": "tiny:llama"})
    with pytest.raises(ValueError, match="on_error"):
        run(SquareJob(), ds, tmp_path / "d", on_error="ignore")
    with pytest.raises(ValueError, match="give a directory"):
        run(SquareJob(), ds, tmp_path / "one.jsonl", state=FakeState(0, 2))
    with pytest.raises(TypeError, match="DatasetDict"):
        run(SquareJob(), datasets.DatasetDict({"train": ds}), tmp_path / "e")
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "shard-00000.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not a JSON record"):
        run(SquareJob(), ds, foreign, progress=False)
    (foreign / "shard-00000.jsonl").write_text('{"id": 0, "index": 0, "result": {}}\n')
    with pytest.raises(ValueError, match="without a run manifest"):
        run(SquareJob(), ds, foreign, progress=False)


def test_files_are_read_as_datasets(tmp_path):
    rows = [{"text": t} for t in TEXTS]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.csv").write_text("text\n" + "".join(f'"{t}"\n' for t in TEXTS))
    a = run(SquareJob(), tmp_path / "rows.jsonl", tmp_path / "a", progress=False)
    b = run(SquareJob(), str(tmp_path / "rows.csv"), tmp_path / "b", progress=False)
    assert a.results == b.results == [{"n2": len(t) ** 2} for t in TEXTS]
    with pytest.raises(ValueError, match="does not exist"):
        run(SquareJob(), tmp_path / "missing.jsonl", tmp_path / "c")


def test_logprobs_and_tokenizer_jobs_match_direct_computation(tmp_path, shared_tiny, torch_one_thread):
    from tokensmith.alignment import encode_pairs, pair_logprobs
    from tokensmith.models.zoo import smollm2_tokenizer

    ad = shared_tiny("llama")
    pairs = [{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin."},
             {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " five"}]
    res = run("logprobs", pairs, tmp_path / "lp", config={"adapter": ad}, progress=False)
    pb = encode_pairs(ad, pairs)
    with torch.no_grad():
        lw, ll = pair_logprobs(ad, pb)
    for i, r in enumerate(res.results):
        assert r["chosen_logp"] == pytest.approx(float(lw[i].double().sum()), abs=1e-4)
        assert r["rejected_logp"] == pytest.approx(float(ll[i].double().sum()), abs=1e-4)
        assert r["chosen_tokens"] == int(pb.mask_w[i].sum()) and r["rejected_tokens"] == int(pb.mask_l[i].sum())
    tok = smollm2_tokenizer()
    rep = run("tokenizer_report", [{"text": t} for t in TEXTS], tmp_path / "tok", progress=False)
    for t, r in zip(TEXTS, rep.results, strict=True):
        assert r["tokens"]["smollm2"] == len(tok(t, add_special_tokens=False)["input_ids"])
        assert r["bytes"] == len(t.encode()) and r["words"] == len(t.split())
    frame = rep.to_pandas()
    assert list(frame.columns[:2]) == ["id", "error"] and "tokens.smollm2" in frame.columns


def test_config_hash_is_stable_and_key_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 16 and isinstance(ts.run, object)


def test_single_file_output(ds, tmp_path):
    path = tmp_path / "one.jsonl"
    res = run(SquareJob(), ds, path, progress=False)
    assert res.computed == len(TEXTS) and Path(str(path) + ".run.json").exists()
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == list(range(len(TEXTS)))


def test_gcg_job_equals_a_direct_gcg_call(tmp_path, shared_tiny, torch_one_thread):
    from tokensmith.optimization import gcg

    ad = shared_tiny("llama")
    rows = [{"goal": "Write a poem", "target": "Sure, here"}, {"goal": "Say hi", "target": "Hi"}]
    kw = {"steps": 2, "search_width": 8, "topk": 8, "suffix": " ! ! ! !"}
    res = run("gcg", rows, tmp_path / "gcg", config={"adapter": ad, "kwargs": kw}, progress=False)
    for row, got in zip(rows, res.results, strict=True):
        want = gcg(ad, row["goal"], row["target"], seed=0, progress=False, **kw).to_dict()
        assert got["best_ids"] == want["best_ids"] and got["best_loss"] == pytest.approx(want["best_loss"], abs=1e-5)
        assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in want["history"]], abs=1e-5)
