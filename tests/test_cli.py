import json
import subprocess
import sys

from featx.cli import format_table, main


def test_cli_models_marks_offline(capsys):
    """Check that 'featx models' lists the Lite models as working offline."""
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["efficientnet_lite0"]["offline"] is True
    assert rows["resnet50"]["offline"] is False


def test_cli_layers_lists_aliases_with_dimensions(capsys):
    """Check that 'featx layers efficientnet_lite0' prints at least 7 aliases with node and dimensions."""
    assert main(["layers", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    for alias in ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "pre_logits", "logits"]:
        assert f"\n{alias} " in out
    assert "blocks.4" in out and "14×14" in out and "1600" in out


def test_cli_layers_unknown_model_is_one_line_exit_1(capsys):
    """Check that a FeatxError becomes one line on stderr and exit code 1."""
    assert main(["layers", "resnet5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Unknown backbone 'resnet5'" in err and "featx models" in err


def test_cli_python_dash_m_help():
    """Check that 'python -m featx --help' works and shows an example."""
    result = subprocess.run([sys.executable, "-m", "featx", "--help"], capture_output=True, text=True, check=True)
    assert "Example:" in result.stdout and "layers" in result.stdout


def test_format_table_aligns_columns():
    """Check that tables are aligned and floats rounded."""
    text = format_table([{"name": "a", "value": 0.123456}, {"name": "long", "value": 2.0}])
    assert text.splitlines() == ["name  value", "----  ------", "a     0.1235", "long  2.0000"]
