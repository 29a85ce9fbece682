import subprocess
import sys

from semi_llie.cli import COMMANDS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semi_llie", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for words, _, _ in COMMANDS:
        assert words[0] in result.stdout


def test_every_command_module_has_arguments_and_main():
    import importlib

    for words, module, _ in COMMANDS:
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments), words
        assert callable(mod.main), words


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    result = run_cli("shards", "verify", str(tmp_path / "does-not-exist"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("semi-llie: error: ")
