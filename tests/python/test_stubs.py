"""The committed type stubs describe the module as built."""

import pathlib
import subprocess
import sys

from conftest import ROOT


def test_stubs_are_current(tmp_path):
    out = tmp_path / "_visikv.pyi"
    subprocess.run(
        [sys.executable, "-m", "nanobind.stubgen", "-q", "-m", "visikv._visikv", "-o", str(out)],
        check=True,
    )
    committed = ROOT / "python" / "visikv" / "_visikv.pyi"
    assert out.read_text() == committed.read_text(), (
        "python/visikv/_visikv.pyi is stale: regenerate it with "
        "PYTHONPATH=build/python python3 -m nanobind.stubgen -m visikv._visikv "
        "-o python/visikv/_visikv.pyi"
    )
