import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "kvpilot", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("agent", "gateway", "controller", "modelserver", "sim", "plan", "demo"):
        assert cmd in out.stdout


def test_unknown_command_is_an_error():
    out = run("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr
