"""Result tables (exact Markdown and CSV text), the environment record, and the results folder."""

import datetime
import json
import platform

import pytest
import torch

from d2gp.reports import ISA_CAPS, environment, markdown_table, write_results, write_table

HEADER = ["method", "PSNR (dB)", "note"]
ROWS = [["baseline", "28.53 ± 2.20", None], ["D2GP", 28.67, "γ = 1, trained"]]


def test_markdown_table_exact_text():
    assert markdown_table(HEADER, ROWS) == (
        "| method | PSNR (dB) | note |\n"
        "|---|---|---|\n"
        "| baseline | 28.53 ± 2.20 | None |\n"
        "| D2GP | 28.67 | γ = 1, trained |"
    )
    assert markdown_table(["a"], []) == "| a |\n|---|"


def test_write_table_writes_markdown_and_csv_exactly(tmp_path):
    write_table(HEADER, ROWS, tmp_path / "table")
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == markdown_table(HEADER, ROWS) + "\n"
    csv_text = (tmp_path / "table.csv").read_bytes().decode("utf-8")
    # the csv module's dialect: CRLF line ends, quotes around a field with a comma, None as empty
    assert csv_text == ("method,PSNR (dB),note\r\n"
                        "baseline,28.53 ± 2.20,\r\n"
                        'D2GP,28.67,"γ = 1, trained"\r\n')


@pytest.mark.parametrize("argv,command", [
    (["/home/u/.venv/bin/d2gp", "demo", "--task", "spc"], "d2gp demo --task spc"),
    (["/src/d2gp/__main__.py", "tasks"], "d2gp tasks"),
    (["benchmarks/quality.py", "--seeds", "0"], "python benchmarks/quality.py --seeds 0"),
])
def test_environment_records_the_command_and_machine(monkeypatch, argv, command):
    import deepinv

    monkeypatch.setattr("sys.argv", argv)
    for cap in ISA_CAPS:
        monkeypatch.delenv(cap, raising=False)
    env = environment()
    assert list(env) == ["command", "date", "machine", "cpu_threads", "python", "torch", "deepinv"]
    assert env["command"] == command
    date = datetime.datetime.fromisoformat(env["date"])
    assert date.tzinfo is not None and abs(date - datetime.datetime.now().astimezone()) < datetime.timedelta(minutes=1)
    assert env["cpu_threads"] == torch.get_num_threads()
    assert env["python"] == platform.python_version()
    assert env["torch"] == str(torch.__version__) and env["deepinv"] == str(deepinv.__version__)
    assert f"{platform.system()} {platform.machine()}" in env["machine"] and "CPUs" in env["machine"]


def test_environment_records_an_instruction_set_cap(monkeypatch):
    """A timing measured under ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY stands for another CPU: say so."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "")
    assert environment()["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert environment()["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_write_results_writes_the_three_files(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["d2gp", "evaluate", "runs/a"])
    out = write_results(tmp_path / "eval", HEADER, ROWS, {"task": "spc", "images": 8})
    assert out == tmp_path / "eval"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.csv", "table.md"]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["environment", "task", "images"]
    assert results["task"] == "spc" and results["images"] == 8
    assert results["environment"]["command"] == "d2gp evaluate runs/a"
