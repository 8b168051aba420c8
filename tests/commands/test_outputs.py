"""An --out that cannot be a folder (a file there or among its parents) is one message, exit 2, in every command."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from unic_cli.cli import unic


@pytest.mark.parametrize("command", [
    ["distill", "--teachers", "timm:test_vit", "--data", "{data}"],
    ["export", "{data}"],
    ["probe", "timm:test_vit", "--task", "knn", "--data", "{data}"],
])
@pytest.mark.parametrize("out", ["a_file", "a_file/run"])
def test_out__under_or_at_a_file_is_one_message(command, out, tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "data").mkdir()
    args = [a.replace("{data}", str(tmp_path / "data")) for a in command] + ["--out", str(tmp_path / out)]
    result = CliRunner().invoke(unic, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    a_file = str(tmp_path / "a_file")
    want = "is a file, not a folder" if out == "a_file" else f"cannot be created: {a_file!r} is a file"
    assert want in result.output
