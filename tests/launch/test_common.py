"""The shared launcher error surface: one named line and exit 2 for user errors, tracebacks kept."""

import errno
import subprocess
import sys
import textwrap

import pytest

from autoshard_jax.errors import ConfigError, check_range, is_user_error

SCRIPT = textwrap.dedent("""
    import sys
    import threading
    from absl import flags
    from autoshard_jax.errors import ConfigError
    from launch.common import run
    flags.DEFINE_string("workdir", None, "")
    flags.DEFINE_string("kind", "user", "")
    def main(argv):
        if flags.FLAGS.kind == "user":
            raise ConfigError("config.log_every must be >= 1, got 0")
        if flags.FLAGS.kind == "half_line":  # a library thread mid-way through a traceback
            wrote, done = threading.Event(), threading.Event()
            def write():
                sys.stderr.write("Traceback (most recent call last):\\n    ")
                wrote.set()
                done.wait()
            threading.Thread(target=write, daemon=True).start()
            wrote.wait()
            raise ConfigError("config.log_every must be >= 1, got 0")
        if flags.FLAGS.kind == "disk":
            raise OSError(28, "No space left on device", "/full/ckpt")
        raise RuntimeError("a bug")
    run(main)
""")


def _run(tmp_path, *args):
    script = tmp_path / "launcher.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          cwd=str(tmp_path.parent), timeout=120,
                          env={"PYTHONPATH": ":".join(sys.path), "PATH": ""})


def test_user_error_is_one_line_and_exit_2(tmp_path):
    work = tmp_path / "work"
    proc = _run(tmp_path, f"--workdir={work}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.log_every must be >= 1")
    assert "Traceback" not in proc.stderr
    assert "ConfigError" in (work / "error.log").read_text()


def test_error_line_starts_a_line_after_a_threads_half_line(tmp_path):
    proc = _run(tmp_path, f"--workdir={tmp_path / 'w'}", "--kind=half_line")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("error: config.log_every"), proc.stderr


def test_url_workdir_is_refused_before_main(tmp_path):
    proc = _run(tmp_path, "--workdir=gs://bucket/run")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("error: workdir 'gs://bucket/run' is a URL")
    assert not (tmp_path.parent / "gs:").exists()


def test_disk_full_names_the_path(tmp_path):
    proc = _run(tmp_path, f"--workdir={tmp_path / 'w'}", "--kind=disk")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: No space left on device: /full")


def test_traceback_flag_and_bugs_keep_the_traceback(tmp_path):
    proc = _run(tmp_path, "--traceback")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = _run(tmp_path, "--kind=bug")
    assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr


def test_is_user_error_sorts_exceptions():
    assert is_user_error(ConfigError("x"))
    assert is_user_error(OSError(errno.ENOSPC, "full"))
    assert not is_user_error(RuntimeError("x"))
    assert not is_user_error(ValueError("x"))
    assert is_user_error(FileNotFoundError("config.data.path 'x' does not exist"))  # no errno
    assert not is_user_error(OSError("x"))


@pytest.mark.parametrize("value,kw", [(0, dict(low=1, integer=True)), (1.5, dict(integer=True)),
                                      (True, dict(integer=True)), ("3", {}), (2, dict(high=1))])
def test_check_range_names_the_key(value, kw):
    with pytest.raises(ConfigError, match="config.log_every"):
        check_range("log_every", value, **kw)
