"""Shared fixtures of the Python tests: the repository's fixture folders and the default model."""

import json
import pathlib

import numpy as np
import pytest

import visikv

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_FIXTURES = ROOT / "tests" / "fixtures" / "models"


def fixture_cases():
    """Every tiny random checkpoint with transformers reference logits."""
    return sorted(p.name for p in MODEL_FIXTURES.iterdir() if (p / "prefill_logits.f32").exists())


def reference(case):
    folder = MODEL_FIXTURES / case
    info = json.loads((folder / "reference.json").read_text())
    shape = info["files"]["prefill_logits"]["shape"]
    logits = np.fromfile(folder / "prefill_logits.f32", dtype="<f4").reshape(shape)
    return folder, info, logits


@pytest.fixture(scope="session")
def default_model():
    return visikv.Model.load("default")
