"""ssh/hostkeys.py: the user's known_hosts files and the admin's global ones, as ssh reads them."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from portfwd.ssh.hostkeys import HostKeyCheck, HostKeyError


def _entry(host: str, key: asyncssh.SSHKey) -> str:
    return f"{host} {key.export_public_key().decode().strip()}\n"


def test_a_bad_line_in_a_global_file_is_skipped_in_the_users_refused(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    user, admin = tmp_path / "known_hosts", tmp_path / "ssh_known_hosts"
    user.write_text("")
    admin.write_text("@bogus-marker host ssh-ed25519 AAAA\n" + _entry("[lab]:2222", key))
    known = HostKeyCheck([str(user)], False, (), (str(admin),)).known_hosts()
    assert known.match("lab", "", 2222)[0] == [key.convert_to_public()]  # the good line still counts
    user.write_text("@revoked-ish lab ssh-ed25519 AAAA\n")
    with pytest.raises(HostKeyError) as caught:
        HostKeyCheck([str(user)], False, (), (str(admin),)).known_hosts()
    assert caught.value.line().startswith(f"{user}:1: not a known_hosts line (")


def test_a_key_changed_in_the_admins_file_points_to_the_users_own(tmp_path: Path) -> None:
    old, new = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    user, admin = tmp_path / "known_hosts", tmp_path / "ssh_known_hosts"
    admin.write_text(_entry("lab", old))
    check = HostKeyCheck([str(user)], True, (), (str(admin),))  # accept-new records nothing here
    assert not check.validate("lab", "192.0.2.1", 22, new.convert_to_public())
    assert check.problem is not None
    line = check.problem.line()
    assert (
        f"{admin}:1 holds another); refusing to connect; if the change is expected, add the new key" in line
    )
    assert f"to {user} (ssh-keyscan -p 22 lab >> {user}), or have {admin} fixed" in line
    assert not user.exists()


def test_with_no_user_file_an_unknown_key_says_what_to_give(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    for accept_new in (False, True):  # accept-new has nowhere to record it
        check = HostKeyCheck([], accept_new, (), (str(tmp_path / "missing"),))
        assert not check.validate("lab", "192.0.2.1", 22, key)
        assert check.problem is not None
        assert check.problem.line() == (
            f"host key for lab is unknown (ssh-ed25519 {key.get_fingerprint()}; not in any known_hosts "
            "file: none is given); add it to ~/.ssh/known_hosts (ssh-keyscan -p 22 lab >> "
            "~/.ssh/known_hosts) and give that file as UserKnownHostsFile"
        )


def test_a_hashed_name_is_matched_as_ssh_matches_it() -> None:
    """HashKnownHosts: the recorded name is `|1|salt|hmac`, and a reader (asyncssh, as ssh) finds it."""
    from portfwd.ssh.hostkeys import hashed_name

    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    line = f"{hashed_name('[db.example]:2222')} {key}\n"
    assert line.startswith("|1|")
    assert "db.example" not in line
    keys, *_ = asyncssh.import_known_hosts(line).match("db.example", "", 2222)
    assert len(keys) == 1
    other, *_ = asyncssh.import_known_hosts(line).match("db.example", "", 22)
    assert not other
