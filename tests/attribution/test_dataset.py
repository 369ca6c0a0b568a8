"""attribute_dataset: same numbers as attribute(), resume after a crash without recomputing, torn writes."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from tokensmith.attribution import attribute, attribute_dataset, read_records
from tokensmith.attribution.progress import progress_scope

ROWS = {
    "uid": ["a", "b", "c", "d"],
    "prompt": ["The sky is", "Grass is", "Snow is", "The sun is"],
    "target": [" blue", " green", " white", " hot"],
}


@pytest.fixture
def ds():
    return datasets.Dataset.from_dict(ROWS)


class Boom(RuntimeError):
    pass


def test_matches_attribute_and_resumes_after_a_crash(ds, tmp_path, shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    path = tmp_path / "out.jsonl"
    calls = []

    def crash_on_c(row):
        calls.append(row["uid"])
        if row["uid"] == "c":
            raise Boom("killed")
        return {}

    with pytest.raises(Boom):
        attribute_dataset(ad, ds, path, id_column="uid", method="input_x_gradient", row_kwargs=crash_on_c,
                          progress=False)
    assert set(read_records(path)) == {"a", "b"}
    calls.clear()
    recs = attribute_dataset(ad, ds, path, id_column="uid", method="input_x_gradient",
                             row_kwargs=lambda r: calls.append(r["uid"]) or {}, progress=False)
    assert calls == ["c", "d"] and recs.computed == 2  # a and b were not recomputed
    assert recs.ids == ["a", "b", "c", "d"]
    for i, r in enumerate(recs):
        ref = attribute(ad, ROWS["prompt"][i], target=ROWS["target"][i], method="input_x_gradient")
        torch.testing.assert_close(r.scores, ref.scores, atol=0, rtol=0)  # JSON keeps fp32 exactly
        assert r.tokens == ref.tokens
    df = recs.to_pandas()
    assert list(df["id"].unique()) == ["a", "b", "c", "d"]


def test_torn_last_line_is_dropped_and_recomputed(ds, tmp_path, shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    path = tmp_path / "out.jsonl"
    attribute_dataset(ad, ds.select(range(2)), path, method="saliency", progress=False)
    full = path.read_bytes()
    lines = full.splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # crash mid-write of row 1
    assert set(read_records(path)) == {0}
    recs = attribute_dataset(ad, ds.select(range(2)), path, method="saliency", progress=False)
    assert recs.computed == 1
    assert path.read_bytes().count(b"\n") == 2  # the torn half line is gone, nothing duplicated
    assert [json.loads(x)["id"] for x in path.read_bytes().splitlines()] == [0, 1]


def test_errors_recorded_retried_and_metrics(ds, tmp_path, shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    path = tmp_path / "out.jsonl"
    bad = ds.to_list()
    bad[1] = {**bad[1], "target": ""}  # an empty target is a clear ValueError
    recs = attribute_dataset(ad, bad, path, method="occlusion", on_error="record", metrics=["comprehensiveness"],
                             progress=False)
    assert recs[1] is None and "ValueError" in recs.errors[1]
    assert set(recs.metrics[0]) == {"comprehensiveness"}
    frame = recs.metrics_frame()
    assert list(frame["id"]) == [0, 1, 2, 3]
    again = attribute_dataset(ad, bad, path, method="occlusion", on_error="record", metrics=["comprehensiveness"],
                              progress=False)
    assert again.computed == 0  # a failed row is a finished row unless asked
    with pytest.raises(ValueError, match="config differs in metrics"):  # another config: refused, not mixed
        attribute_dataset(ad, bad, path, method="occlusion", on_error="record", progress=False)
    fixed = attribute_dataset(ad, ds.to_list(), path, method="occlusion", metrics=["comprehensiveness"],
                              retry_errors=True, progress=False)
    assert fixed.computed == 1 and not fixed.errors and fixed[1] is not None


def test_bad_input(ds, tmp_path, shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\]"):
        attribute_dataset(ad, ds, tmp_path / "x.jsonl", input_column="text")
    dup = datasets.Dataset.from_dict({**ROWS, "uid": ["a", "a", "b", "c"]})
    with pytest.raises(ValueError, match="duplicate"):
        attribute_dataset(ad, dup, tmp_path / "x.jsonl", id_column="uid")
    with pytest.raises(ValueError, match="on_error"):
        attribute_dataset(ad, ds, tmp_path / "x.jsonl", on_error="ignore")
    (tmp_path / "foreign.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not a JSON record"):
        attribute_dataset(ad, ds, tmp_path / "foreign.jsonl")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        attribute_dataset(ad, "prompts.csv", tmp_path / "x.jsonl")


def test_progress_bar_shows_and_leaves_numbers_alone(shared_tiny, capsys, torch_one_thread):
    ad = shared_tiny("llama")
    quiet = attribute(ad, "The sky is", target=" blue today", method="occlusion", progress=False)
    with progress_scope(True, delay=0.0):
        loud = attribute(ad, "The sky is", target=" blue today", method="occlusion", progress=None)
    err = capsys.readouterr().err
    assert "perturbations" in err
    torch.testing.assert_close(loud.scores, quiet.scores, atol=0, rtol=0)
    with progress_scope(True, delay=0.0):
        attribute(ad, "The sky is", target=" blue", method="ig", n_steps=4, baseline=42, progress=None)
    assert "gradient points" in capsys.readouterr().err
