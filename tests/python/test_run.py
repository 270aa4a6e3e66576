"""Command lines run in-process (visikv.run, visikv.evaluate): the same JSON as the program."""

import json
import subprocess

import pytest
from conftest import MODEL_FIXTURES, ROOT

import visikv

LLAMA = str(MODEL_FIXTURES / "llama")
TEXT = str(ROOT / "README.md")


def program_json(tmp_path, *args):
    out = tmp_path / "out.json"
    subprocess.run([str(ROOT / "build" / "visikv"), *args, "--json", str(out)], check=True,
                   capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "command",
    [
        ["ppl", LLAMA, "--file", TEXT, "--tokens", "60", "--window", "24", "--keys", "int3:g16:tok"],
        ["eval", "sparse-ppl", LLAMA, "--text", TEXT, "--tokens", "40", "--window", "32",
         "--selectors", "sparse:a1:w8:k4:exact"],
    ],
)
def test_run_returns_the_programs_json(tmp_path, command):
    ours = visikv.run(*command)
    theirs = program_json(tmp_path, *command)
    # Timings differ between runs; everything else is the same.
    timing = {"seconds", "tokens_per_s", "elapsed_seconds"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in timing}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    assert strip(ours) == strip(theirs)


def test_evaluate_builds_the_flags():
    model = visikv.Model.load(LLAMA)
    direct = visikv.run("ppl", LLAMA, "--file", TEXT, "--tokens", "30", "--window", "16",
                        "--keys", "int4:g16:tok")
    assert visikv.evaluate("ppl", model, file=TEXT, tokens=30, window=16,
                           keys="int4:g16:tok")["nll"] == direct["nll"]
    assert model.perplexity(file=TEXT, tokens=30, window=16, keys="int4:g16:tok")["nll"] == \
        direct["nll"]


def test_run_without_json_help_and_errors():
    assert visikv.run("info", LLAMA) is None
    assert "--window" in visikv.run("ppl", "--help")["help"]
    assert "--tokens" in visikv.run("eval", "kv", "--help")["help"]
    with pytest.raises(visikv.Error, match="unknown command 'frobnicate'"):
        visikv.run("frobnicate")
    with pytest.raises(visikv.Error, match="--window"):
        visikv.run("ppl", LLAMA, "--window", "1")
    with pytest.raises(visikv.Error, match="--keys"):
        visikv.evaluate("ppl", LLAMA, keys="int9:g16:tok")
    with pytest.raises(visikv.Error, match="no-such"):
        visikv.evaluate("ppl", "/no-such/model.gguf")
