"""`mixprec formats` and the CLI frame: --help for every command, bad input gives one line and exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec.cli import COMMANDS, main

MIXPREC = str(Path(sys.executable).parent / "mixprec")  # the console script next to this Python


def test_formats_json_lists_every_named_format_with_its_numbers(capsys):
    assert main(["formats", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"fp32", "fp16", "bf16", "e4m3", "e5m2"}
    assert rows["fp16"]["max"] == 65504.0 and rows["fp16"]["min_subnormal"] == 2.0**-24
    assert rows["e4m3"]["max"] == 448.0 and rows["e4m3"]["inf"] is False
    assert rows["bf16"]["torch_dtype"] == "bfloat16"


def test_formats_table_fits_80_columns():
    out = subprocess.run([MIXPREC, "formats"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, check=True).stdout
    assert "65504" in out and "448" in out and "2^-24" in out
    assert max(len(line) for line in out.splitlines()) <= 80


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mixprec " + command in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "formats" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([MIXPREC, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout
