"""`[listen]`'s limits of streams and shares: read, defaulted, and explained when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_config import MINIMAL, load, only_problem, workdir

__all__ = ["workdir"]  # the fixture, shared with test_config

pytestmark = pytest.mark.timeout(10)


def test_limits_have_defaults_that_leave_room_for_plain_requests(workdir: Path) -> None:
    """With nothing set: 128 of 256 places for streams, TCP half, one uid a quarter, an hour."""
    listen = load(workdir, MINIMAL).listen
    assert (listen.max_connections, listen.max_streams) == (256, 128)
    assert (listen.tcp_share, listen.uid_share, listen.stream_max_age_s) == (0.5, 0.25, 3600.0)
    assert listen.watch_heartbeat_s == 15.0


def test_the_front_door_is_on_unless_turned_off(workdir: Path) -> None:
    """`front_door` defaults to true, `false` turns it off, and a non-boolean is explained."""
    assert load(workdir, MINIMAL).listen.front_door is True
    assert load(workdir, "[listen]\nfront_door = false\n" + MINIMAL).listen.front_door is False
    problem = only_problem(workdir, '[listen]\nfront_door = "no"\n' + MINIMAL)
    assert problem.key == "listen.front_door" and "boolean" in problem.message


def test_limits_are_read(workdir: Path) -> None:
    """Each key is taken as written."""
    text = (
        "[listen]\nmax_connections = 100\nmax_streams = 10\nstream_max_age_s = 60\n"
        "tcp_share = 0.3\nuid_share = 0.1\nwatch_heartbeat_s = 5\n" + MINIMAL
    )
    listen = load(workdir, text).listen
    assert (listen.max_streams, listen.stream_max_age_s, listen.watch_heartbeat_s) == (10, 60, 5)
    assert (listen.tcp_share, listen.uid_share) == (0.3, 0.1)
    assert (listen.cap(0.3, 100), listen.cap(0.1, 5)) == (30, 1)


@pytest.mark.parametrize(
    ("text", "key", "phrase"),
    [
        pytest.param(
            "max_connections = 10\nmax_streams = 10\n",
            "listen.max_streams",
            "max_streams (10) must be less than max_connections (10)",
            id="streams-not-below-connections",
        ),
        pytest.param("max_streams = 0\n", "listen.max_streams", "1 or more", id="no-streams"),
        pytest.param(
            "stream_max_age_s = 0\n", "listen.stream_max_age_s", "more than zero", id="age-zero"
        ),
        pytest.param(
            "watch_heartbeat_s = 0\n", "listen.watch_heartbeat_s", "more than zero", id="beat"
        ),
        pytest.param(
            "tcp_share = 1\n", "listen.tcp_share", "more than 0 and less than 1", id="tcp-all"
        ),
        pytest.param("uid_share = 0\n", "listen.uid_share", "e.g. uid_share = 0.25", id="uid-none"),
        pytest.param(
            'uid_share = "half"\n', "listen.uid_share", "expected a number", id="uid-text"
        ),
    ],
)
def test_wrong_limits_are_explained(workdir: Path, text: str, key: str, phrase: str) -> None:
    """Each mistake is one problem at its key, in the file, saying what to write instead."""
    problem = only_problem(workdir, "[listen]\n" + text + MINIMAL)
    assert problem.key == key
    assert phrase in f"{problem.message} — {problem.fix}"
    assert problem.file == str(workdir / "broker.toml") and problem.line is not None
