"""deploy/image/dockerd.sh, the way `make image-test` gets a Docker daemon: started only when
none answers, stopped only if started here, and a failure that says why, never a skip.

`docker`, `dockerd` and `id` are stand-ins (shell scripts first on PATH) so that these run in
`make test`, without Docker: the daemon's behaviour is the process edge being faked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "image" / "dockerd.sh"

# `docker info` answers once the stand-in daemon has made its `running` file.
DOCKER = """#!/bin/sh
[ "$1" = info ] && [ -e "$FAKE_STATE/running" ]
"""
DYING = """#!/bin/sh
echo "failed to start daemon: error initializing graphdriver: the test's reason" >&2
exit 1
"""
# A daemon that runs until SIGTERM, answering (or not) as ANSWERS says, and notes each step;
# it ends by itself after 30 s, so that a script failing to stop it leaves nothing behind.
RUNNING = """#!/bin/sh
touch "$FAKE_STATE/started"
trap 'touch "$FAKE_STATE/stopped"; rm -f "$FAKE_STATE/running"; exit 0' TERM
[ "$ANSWERS" = yes ] && touch "$FAKE_STATE/running"
i=0
while [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
"""


def run(tmp_path: Path, daemon: str, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """dockerd.sh COMMAND with the stand-ins, as root (the stand-in `id` says 0)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("docker", DOCKER), ("dockerd", daemon), ("id", "#!/bin/sh\necho 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    environ = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_STATE": str(state),
        "DOCKERD_LOG": str(tmp_path / "dockerd.log"),
        "DOCKERD_LOCK": str(tmp_path / "dockerd.lock"),
        **env,
    }
    return subprocess.run(
        [str(SCRIPT), "sh", "-c", command],
        capture_output=True,
        text=True,
        env=environ,
        timeout=20,
        check=False,
        cwd=tmp_path,
    )


def test_a_daemon_that_answers_is_used_and_left_alone(tmp_path: Path) -> None:
    """With `docker info` answering already, no dockerd starts, and COMMAND's exit status is
    the script's."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "running").touch()
    done = run(tmp_path, RUNNING, "touch ran; exit 3", ANSWERS="yes")
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "ran").exists()
    assert not (tmp_path / "state" / "started").exists()


def test_a_daemon_started_here_is_stopped_after(tmp_path: Path) -> None:
    """With none answering, dockerd starts, COMMAND runs once it answers, and the daemon gets
    SIGTERM when COMMAND ends, whatever COMMAND's status."""
    done = run(tmp_path, RUNNING, "docker info && touch ran; exit 4", ANSWERS="yes")
    assert done.returncode == 4, done.stderr
    assert (tmp_path / "ran").exists()
    assert (tmp_path / "state" / "started").exists()
    assert (tmp_path / "state" / "stopped").exists(), done.stderr
    assert "stopping the dockerd started here" in done.stderr


def test_a_daemon_that_dies_fails_the_run_with_its_last_words(tmp_path: Path) -> None:
    """A dockerd that exits at start fails the run with exit 1, its status and its log's
    last lines; COMMAND never runs."""
    done = run(tmp_path, DYING, "touch ran")
    assert done.returncode == 1
    assert "dockerd exited with status 1 before answering" in done.stderr
    assert "the test's reason" in done.stderr
    assert not (tmp_path / "ran").exists()


def test_a_daemon_that_never_answers_fails_at_the_timeout_and_is_stopped(tmp_path: Path) -> None:
    """A dockerd that runs but never answers fails the run after DOCKERD_TIMEOUT seconds, and
    is stopped rather than left behind."""
    done = run(tmp_path, RUNNING, "touch ran", ANSWERS="no", DOCKERD_TIMEOUT="1")
    assert done.returncode == 1
    assert "did not answer 'docker info' within 1 s" in done.stderr
    assert not (tmp_path / "ran").exists()
    assert (tmp_path / "state" / "stopped").exists(), done.stderr


def test_without_root_or_dockerd_the_run_fails_and_says_what_to_do(tmp_path: Path) -> None:
    """No daemon answering and no dockerd to start: exit 1 naming `make image-tools`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    done = subprocess.run(
        [str(SCRIPT), "true"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:/bin", "DOCKERD_LOCK": str(tmp_path / "lock")},
        timeout=20,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "make image-tools" in done.stderr
