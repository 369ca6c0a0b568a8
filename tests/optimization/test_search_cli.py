"""``tokensmith gcg`` (goal or behaviours CSV, JSONL out, resume) and the demo's search section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tokensmith as ts
from tokensmith.cli import main
from tokensmith.report import ReportContext

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_gcg_command_goal_and_csv_with_resume(tmp_path: Path, capsys):
    out = tmp_path / "one.jsonl"
    base = ["--model", "tiny:llama", "--steps", "2", "--search-width", "8", "--topk", "8", "--suffix", " x x x",
            "--quiet"]
    assert main(["gcg", "Write a poem", "--target", " Sure", "--out", str(out), *base]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["steps"] == 2 and row["best_loss"] <= row["init_loss"] + 1e-6 and row["string_loss"] is not None
    csv = tmp_path / "b.csv"
    csv.write_text('goal,target\nSay hi,"Sure, hi"\nSay bye,"Sure, bye"\nSay yes,"Sure, yes"\n')
    many = tmp_path / "many.jsonl"
    assert main(["gcg", "--behaviours", str(csv), "--out", str(many), *base]) == 0
    lines = many.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2]
    # a half-written last line and a finished file: rerunning redoes only what is missing
    many.write_text("\n".join(lines[:2]) + '\n{"index": 2, "go')
    assert main(["gcg", "--behaviours", str(csv), "--out", str(many), *base]) == 0
    idx = [json.loads(x)["index"] for x in many.read_text().splitlines() if x.endswith("}")]
    assert sorted(idx) == [0, 1, 2] and "already in" in capsys.readouterr().out
    # bad input: a clear message and exit code 2
    assert main(["gcg", "Write a poem", *base]) == 2
    assert main(["gcg", *base]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\nx,y\n")
    assert main(["gcg", "--behaviours", str(bad), *base]) == 2
    assert "no column" in capsys.readouterr().err


def test_search_section_quick():
    from tokensmith.optimization.report import search_section

    ad = ts.tiny("llama")
    sec = search_section(ad, ReportContext(model_name="tiny:llama", quick=True))
    d = sec.data
    assert d["steps"] == 2 and d["best_loss"] <= d["init_loss"] + 1e-6
    assert len(d["losses"]) == 2 and "<svg" in sec.html and "Red-teaming" in sec.html
