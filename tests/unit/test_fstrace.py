"""The durability checker (tests/fstrace.py) on hand-written strace logs: it passes the protocol the store
follows and catches each missing fsync, so that tests/integration/test_durability.py can fail."""

from __future__ import annotations

from pathlib import Path

from tests.fstrace import check, parse

ROOT = Path("/s")

# write_atomic of /s/journal.json, then a connect: the protocol followed.
WRITE_ATOMIC = """\
100  openat(AT_FDCWD</w>, "/s/.journal.json.tmp-100", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = 7</s/.journal.json.tmp-100>
100  write(7</s/.journal.json.tmp-100>, ""..., 407) = 407
100  fsync(7</s/.journal.json.tmp-100>) = 0
100  close(7</s/.journal.json.tmp-100>) = 0
100  rename("/s/.journal.json.tmp-100", "/s/journal.json") = 0
100  openat(AT_FDCWD</w>, "/s", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 7</s>
100  fsync(7</s>) = 0
100  close(7</s>) = 0
101  connect(9<TCP:[1]>, {sa_family=AF_INET, sin_port=htons(8883), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)
"""  # noqa: E501


def _without(log: str, fragment: str) -> str:
    return "".join(line for line in log.splitlines(keepends=True) if fragment not in line)


def _violations(log: str, *, not_state: tuple[str, ...] = ()) -> list[str]:
    return check(log, ROOT, Path("/w"), not_state=not_state).violations


def test_the_protocol_followed_passes_and_is_seen() -> None:
    report = check(WRITE_ATOMIC, ROOT, Path("/w"))
    assert report.violations == []
    assert dict(report.calls) == {"create": 1, "rename": 1, "fsync": 2, "connect": 1}


def test_a_file_renamed_before_its_fsync_is_caught() -> None:
    violations = _violations(_without(WRITE_ATOMIC, "fsync(7</s/.journal"))
    assert violations == [
        "line 4: /s/.journal.json.tmp-100 is renamed to /s/journal.json, but write /s/.journal.json.tmp-100 (line 2) "
        "is not fsync'd",
        "line 8: connect(2) while file /s/journal.json is not fsync'd after write /s/.journal.json.tmp-100 (line 2)",
    ]


def test_a_directory_not_synced_before_a_connect_is_caught() -> None:
    violations = _violations(_without(WRITE_ATOMIC, "fsync(7</s>)"))
    assert violations == [  # the temporary file's creation is superseded by its rename
        "line 8: connect(2) while directory /s is not fsync'd after rename from /s/.journal.json.tmp-100 (line 5)",
        "line 8: connect(2) while directory /s is not fsync'd after rename to /s/journal.json (line 5)",
    ]


def test_at_the_end_nothing_may_be_pending() -> None:
    log = '100  unlinkat(AT_FDCWD</w>, "/s/journal.json", 0) = 0\n'
    assert _violations(log) == ["end: directory /s is not fsync'd after unlink /s/journal.json (line 1)"]


def test_paths_outside_the_root_and_failed_calls_do_not_count() -> None:
    log = (
        '100  unlink("/elsewhere/file") = 0\n'
        '100  unlink("/s/missing") = -1 ENOENT (No such file or directory)\n'
        '100  mkdir("/stale", 0700) = 0\n'
    )
    assert _violations(log) == []


def test_a_hand_over_to_awscrt_counts_for_the_thread_that_made_the_change_only() -> None:
    log = (
        '100  mkdir("/s/staging-1", 0700) = 0\n'
        '200  write(8<anon_inode:[eventfd]>, "\\1\\0\\0\\0\\0\\0\\0\\0", 8) = 8\n'  # the network thread's own work
        '100  write(8<anon_inode:[eventfd]>, "\\1\\0\\0\\0\\0\\0\\0\\0", 8) = 8\n'  # the request of thread 100
    )
    assert _violations(log) == [
        "line 3: a request handed to awscrt while directory /s is not fsync'd after mkdir /s/staging-1 (line 1)"
    ]


def test_a_program_started_is_a_step_that_relies_on_what_was_stored() -> None:
    log = (
        '100  unlink("/s/journal.json") = 0\n300  execve("/hooks/10-mark", ["/hooks/10-mark"], 0x1 /* 9 vars */) = 0\n'
    )
    assert _violations(log) == [
        "line 2: a program started while directory /s is not fsync'd after unlink /s/journal.json (line 1)"
    ]


STAGED_AND_PUBLISHED = """\
100  mkdir("/s/staging-1", 0700) = 0
100  openat(AT_FDCWD</w>, "/s", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 7</s>
100  fsync(7</s>) = 0
100  openat(AT_FDCWD</w>, "/s/staging-1/certificate.pem", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0644) = 8</s/staging-1/certificate.pem>
100  write(8</s/staging-1/certificate.pem>, ""..., 721 <unfinished ...>
200  close(12<pipe:[5]>) = 0
100  <... write resumed>) = 721
100  fchmod(8</s/staging-1/certificate.pem>, 0640) = 0
100  fsync(8</s/staging-1/certificate.pem>) = 0
100  openat(AT_FDCWD</w>, "/s/staging-1", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 9</s/staging-1>
100  fsync(9</s/staging-1>) = 0
100  rename("/s/staging-1", "/s/generations/1") = 0
100  openat(AT_FDCWD</w>, "/s/generations", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 9</s/generations>
100  fsync(9</s/generations>) = 0
100  symlink("generations/1", "/s/current.tmp-100") = 0
100  rename("/s/current.tmp-100", "/s/current") = 0
100  fsync(7</s>) = 0
"""  # noqa: E501


def test_a_generation_is_published_only_once_durable() -> None:
    report = check(STAGED_AND_PUBLISHED, ROOT, Path("/w"))
    assert report.violations == []
    assert dict(report.calls) == {"mkdir": 1, "create": 1, "symlink": 1, "rename": 2, "fsync": 5}


def test_a_file_changed_after_its_fsync_makes_its_directory_unfit_to_rename() -> None:
    late_mode = STAGED_AND_PUBLISHED.replace(
        '100  openat(AT_FDCWD</w>, "/s/staging-1", O_RDONLY',
        '100  fchmod(8</s/staging-1/certificate.pem>, 0644) = 0\n100  openat(AT_FDCWD</w>, "/s/staging-1", O_RDONLY',
    )
    violations = _violations(late_mode)
    assert violations[0] == (
        "line 13: /s/staging-1 is renamed to /s/generations/1, but fchmod /s/staging-1/certificate.pem (line 10) "
        "is not fsync'd"
    )
    # and the symlinks to it, and the end of the run, are told too
    assert len(violations) == 4 and violations[-1].startswith("end: file /s/generations/1/certificate.pem")


def test_a_symlink_to_a_generation_not_yet_durable_is_caught() -> None:
    violations = _violations(_without(STAGED_AND_PUBLISHED, "fsync(9</s/generations>)"))
    assert violations[:2] == [
        "line 14: the symlink /s/current.tmp-100 -> generations/1 is made, but rename to /s/generations/1 (line 12) "
        "is not fsync'd",
        "line 15: the symlink /s/current is put in place, but rename to /s/generations/1 (line 12) is not fsync'd",
    ]


def test_a_staging_directory_renamed_with_an_entry_not_durable_is_caught() -> None:
    violations = _violations(_without(STAGED_AND_PUBLISHED, "fsync(9</s/staging-1>)"))
    assert violations[0] == (
        "line 11: /s/staging-1 is renamed to /s/generations/1, but create /s/staging-1/certificate.pem (line 4) "
        "is not fsync'd"
    )
    assert violations[-1] == (
        "end: directory /s/generations/1 is not fsync'd after create /s/staging-1/certificate.pem (line 4)"
    )


def test_files_that_are_not_state_may_stay_unsynced() -> None:
    log = (
        '100  openat(AT_FDCWD</w>, "/s/lock", O_RDWR|O_CREAT|O_NOFOLLOW|O_CLOEXEC, 0600) = 6</s/lock>\n'
        '100  pwrite64(6</s/lock>, ""..., 5, 0) = 5\n'
    )
    assert _violations(log, not_state=("lock",)) == []
    assert len(_violations(log)) == 2


def test_an_interrupted_call_is_joined_with_its_resumption() -> None:
    log = '100  renameat2(AT_FDCWD</w>, "/s/a", AT_FDCWD</w>, "/s/b", RENAME_NOREPLACE <unfinished ...>\n'
    log += "200  close(3</x>) = 0\n100  <... renameat2 resumed>) = 0\n"
    [close, rename] = parse(log)
    assert (rename.line, rename.name, rename.args[3], rename.result) == (3, "renameat2", '"/s/b"', "0")
    assert close.name == "close"
