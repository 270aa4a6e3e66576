"""`python -m visikv.sweep` on a local two-worker Ray: every row x model x context runs once, the
results are the commands' own JSON, and a second run over the same file runs only what is
missing."""

import json
import os
import subprocess
import sys

import pytest
from conftest import MODEL_FIXTURES, ROOT

import visikv
from visikv.sweep import expand



def spec(tmp_path):
    text = ROOT / "README.md"
    return {
        "models": [str(MODEL_FIXTURES / "llama"), str(MODEL_FIXTURES / "qwen2")],
        "contexts": [16, 32],
        "rows": [
            {"command": "ppl", "options": {"file": str(text), "tokens": 48}},
            {"command": "ppl", "options": {"file": str(text), "tokens": 48, "keys": "int4:g16:tok"}},
        ],
        "threads": 1,
    }


def run_sweep(spec_path, out):
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-m", "visikv.sweep", str(spec_path), "--out", str(out), "--workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_sweep_runs_every_task_once_and_resumes(tmp_path):
    s = spec(tmp_path)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(s))
    out = tmp_path / "sweep.json"

    first = run_sweep(spec_path, out)
    assert "ran 8 tasks" in first.stderr
    results = json.loads(out.read_text())["results"]
    assert len(results) == 8 and len({r["key"] for r in results}) == 8
    assert (tmp_path / "sweep.md").read_text().count("| ppl |") == 8
    # Each result is what the command computes when run directly.
    for r in results[:: 3]:
        options = dict(r["options"])
        options.pop("threads")
        direct = visikv.evaluate(r["command"], r["model"], **options)
        assert r["result"]["nll"] == direct["nll"]
        assert r["result"]["window"] == r["options"]["window"]
    # The 4-bit keys change the result; the window changes it too.
    nlls = {(r["model"], r["options"].get("keys"), r["options"]["window"]): r["result"]["nll"]
            for r in results}
    llama = str(MODEL_FIXTURES / "llama")
    assert nlls[(llama, None, 16)] != nlls[(llama, "int4:g16:tok", 16)]
    assert nlls[(llama, None, 16)] != nlls[(llama, None, 32)]

    second = run_sweep(spec_path, out)
    assert "ran 0 tasks" in second.stderr
    assert json.loads(out.read_text())["results"] == results

    # Drop three results, as an interrupted sweep would have left them: only those run again.
    partial = json.loads(out.read_text())
    partial["results"] = partial["results"][3:]
    out.write_text(json.dumps(partial))
    third = run_sweep(spec_path, out)
    assert "ran 3 tasks" in third.stderr
    again = json.loads(out.read_text())["results"]
    assert [r["key"] for r in again] == [r["key"] for r in results]
    assert [r["result"]["nll"] for r in again] == [r["result"]["nll"] for r in results]


def test_bad_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match="'models' must be a non-empty list"):
        expand({"rows": [{"command": "ppl"}]})
    with pytest.raises(ValueError, match="row 0 has unknown fields"):
        expand({"models": ["default"], "rows": [{"command": "ppl", "option": {}}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "visikv.sweep", str(bad)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and "visikv.sweep: error" in done.stderr
