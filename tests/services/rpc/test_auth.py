"""The tokens file of `influence serve --auth-tokens` (rpc/auth.py TokenFile) on a manual clock:
re-read when it changed, at the first check after the re-check interval and not before, and a
file that became invalid or unreadable keeps the tokens in force. The served end of rotation is
in test_security.py."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from services.rpc.auth import TokenFile
from tests.support.clock import ManualClock

RECHECK = 1.0


def write(path: Path, text: str) -> None:
    """Write `text` and give the file a modification time of its own: two writes within one tick
    of the file system's clock would otherwise look unchanged (the size is often the same)."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(previous + 10**9, previous + 10**9))


def lines(tokens: dict[str, str]) -> str:
    return "# TOKEN TENANT\n" + "".join(f"{token} {tenant}\n" for token, tenant in tokens.items())


def test_a_changed_file_is_read_at_the_first_check_after_the_interval_and_not_before(tmp_path):
    alice, bob, new_bob = (secrets.token_hex(16) for _ in range(3))
    path = tmp_path / "tokens.txt"
    write(path, lines({alice: "alice", bob: "bob"}))
    clock = ManualClock()
    tokens = TokenFile(path, recheck_seconds=RECHECK, clock=clock.now)
    assert (tokens.tenant_of(alice), tokens.tenant_of(bob), tokens.tenant_of(new_bob)) == ("alice", "bob", None)

    write(path, lines({alice: "alice", new_bob: "bob"}))
    clock.advance(RECHECK / 2)
    assert (tokens.tenant_of(bob), tokens.tenant_of(new_bob)) == ("bob", None), "re-checked before the interval"
    clock.advance(RECHECK / 2)
    assert (tokens.tenant_of(alice), tokens.tenant_of(bob), tokens.tenant_of(new_bob)) == ("alice", None, "bob")


def test_a_file_that_became_invalid_or_unreadable_keeps_the_tokens_in_force(tmp_path, caplog):
    alice, carol = secrets.token_hex(16), secrets.token_hex(16)
    path = tmp_path / "tokens.txt"
    write(path, lines({alice: "alice"}))
    clock = ManualClock()
    tokens = TokenFile(path, recheck_seconds=RECHECK, clock=clock.now)
    caplog.set_level(logging.INFO, logger="influence.auth")

    write(path, "not a valid line at all\n")  # e.g. half-written
    clock.advance(RECHECK)
    assert tokens.tenant_of(alice) == "alice"
    path.unlink()
    clock.advance(RECHECK)
    assert tokens.tenant_of(alice) == "alice"
    assert [record.levelname for record in caplog.records] == ["WARNING", "WARNING"]
    assert "line 1: expected 'TOKEN TENANT', got 6 fields" in caplog.records[0].getMessage()
    assert "cannot read" in caplog.records[1].getMessage()

    write(path, lines({carol: "carol"}))  # repaired: the new tokens, and only they
    clock.advance(RECHECK)
    assert (tokens.tenant_of(carol), tokens.tenant_of(alice)) == ("carol", None)
    assert alice not in caplog.text and carol not in caplog.text
