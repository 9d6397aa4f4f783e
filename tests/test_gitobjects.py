"""The validator's object reader gives the same changes as `git diff-tree -p` on real repositories."""

import os
from pathlib import Path

import pytest

from actors.gitobjects import ObjectReader, ObjectReaders
from actors.policy import FileChange, Policy, read_diff
from tests.conftest import commit_all, git, make_repo, processes_mentioning


def fields(changes: list[FileChange]) -> list[tuple[object, ...]]:
    return sorted(
        (c.path, c.status, c.old_mode, c.new_mode, c.old_sha, c.new_sha, c.added, c.deleted, c.added_text, c.binary)
        for c in changes
    )


def test_same_changes_as_git_diff_tree(repo: Path) -> None:
    (repo / "src" / "deep" / "er").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("".join(f"line {i}\n" for i in range(50)))
    (repo / "src" / "deep" / "er" / "b.txt").write_text("keep\nold\n")
    (repo / "gone.txt").write_text("bye\nbye\n")
    (repo / "tail").write_text("no newline")
    (repo / "dir_then_file").mkdir()
    (repo / "dir_then_file" / "x").write_text("x\n")
    (repo / "file_then_link").write_text("content\n")
    (repo / "tool.sh").write_text("#!/bin/sh\n")
    (repo / "blob.bin").write_bytes(b"\0\1\2" * 10)
    (repo / "ünïcode name.md").write_text("ä\n")
    base = commit_all(repo, "base")

    text = (repo / "src" / "a.py").read_text().replace("line 7\n", "line 7 changed\n") + "appended\n"
    (repo / "src" / "a.py").write_text(text)
    (repo / "src" / "deep" / "er" / "b.txt").write_text("keep\nnew\nmore\n")
    (repo / "src" / "deep" / "new.py").write_text("API_KEY = 'x'\n")
    (repo / "gone.txt").unlink()
    (repo / "tail").write_text("no newline\nnow more")
    (repo / "dir_then_file" / "x").unlink()
    (repo / "dir_then_file").rmdir()
    (repo / "dir_then_file").write_text("a file now\n")
    (repo / "file_then_link").unlink()
    (repo / "file_then_link").symlink_to("../outside")
    (repo / "tool.sh").chmod(0o755)
    (repo / "blob.bin").write_bytes(b"\0\3\4" * 10)
    (repo / "ünïcode name.md").write_text("ä\nö\n")
    (repo / "empty").write_text("")
    head = commit_all(repo, "change")

    reader = ObjectReader(repo)
    try:
        mine = reader.diff(base, head)
        assert fields(mine) == fields(read_diff(repo, base, head))
        statuses = {c.path: c.status for c in mine}
        assert statuses["file_then_link"] == "T"
        assert statuses["gone.txt"] == "D"
        assert statuses["dir_then_file"] == "A"
        assert statuses["dir_then_file/x"] == "D"
        # The root commit: everything added.
        first = git(repo, "rev-list", "--max-parents=0", "HEAD")
        assert fields(reader.diff(None, first)) == fields(read_diff(repo, None, first))
        # The same policy findings either way.
        policy = Policy()
        assert policy.check_files(mine) == policy.check_files(read_diff(repo, base, head))
    finally:
        reader.close()


def test_objects_written_later_are_found_and_a_gitlink_is_a_change(repo: Path) -> None:
    reader = ObjectReader(repo)
    try:
        base = git(repo, "rev-parse", "HEAD")
        assert reader.diff(base, base) == []
        (repo / "later.txt").write_text("written after the reader started\n")
        sub = "1" * 40
        git(repo, "add", "later.txt")
        git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sub},vendor/sub")
        git(repo, "commit", "-qm", "later")  # not `add -A`: it would drop the gitlink (no checkout)
        head = git(repo, "rev-parse", "HEAD")
        changes = {c.path: c for c in reader.diff(base, head)}
        assert changes["later.txt"].added_text == "written after the reader started"
        assert changes["vendor/sub"].new_mode == "160000"
        assert changes["vendor/sub"].status == "A"
        assert fields(list(changes.values())) == fields(read_diff(repo, base, head))
        # A repacked repository (objects moved into a pack) is still read.
        git(repo, "gc", "-q", "--prune=now")
        assert fields(reader.diff(base, head)) == fields(read_diff(repo, base, head))
    finally:
        reader.close()


def test_moved_lines_are_not_added_content(repo: Path) -> None:
    (repo / "list.txt").write_text("a\nb\nc\n")
    base = commit_all(repo, "base")
    (repo / "list.txt").write_text("c\na\nb\n")
    head = commit_all(repo, "moved")
    reader = ObjectReader(repo)
    try:
        [change] = reader.diff(base, head)
    finally:
        reader.close()
    assert (change.added, change.deleted, change.added_text) == (0, 0, "")


def test_unknown_commit_is_an_error_and_the_reader_recovers(repo: Path) -> None:
    reader = ObjectReader(repo)
    try:
        with pytest.raises(RuntimeError, match="not a commit"):
            reader.diff(None, "f" * 40)
        head = git(repo, "rev-parse", "HEAD")
        assert [c.path for c in reader.diff(None, head)] == ["README.md"]
    finally:
        reader.close()


def test_readers_are_bounded_and_closed(tmp_path: Path) -> None:
    repos = [make_repo(tmp_path / f"r{i}") for i in range(3)]
    for repo in repos:
        git(repo, "gc", "-q")  # packed objects are read through `git cat-file`
    readers = ObjectReaders(size=2)
    marker = "cat-file --batch"
    before = len(processes_mentioning(marker))
    try:
        for repo in repos:
            readers.diff(repo, None, git(repo, "rev-parse", "HEAD"))
        live = [pid for pid in processes_mentioning(marker) if _cwd(pid) in {str(r) for r in repos}]
        assert len(live) == 2  # the first one was closed when the third opened
    finally:
        readers.close()
    assert [pid for pid in processes_mentioning(marker) if _cwd(pid) in {str(r) for r in repos}] == []
    assert len(processes_mentioning(marker)) <= before


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def test_lean_reading_gives_the_same_findings(repo: Path) -> None:
    """With the checkpoint's numstat, only what a rule needs is read; the findings are the same."""
    from actors.checkpoints import parse_numstat
    from actors.policy import FindingCache
    from actors.validator import recorded_stats
    from events.types import CheckpointCreated, FileStat

    (repo / "old_secret.py").write_text("AWS = 'AKIAABCDEFGHIJKLMNOP'\nx = 1\n")
    (repo / "requirements.txt").write_text("requests==2.0\n")
    (repo / "plain.py").write_text("a = 1\n")
    (repo / "link").symlink_to("README.md")
    (repo / "was_file").write_text("text\n")
    base = commit_all(repo, "base")
    (repo / "old_secret.py").write_text("AWS = 'AKIAABCDEFGHIJKLMNOP'\nx = 2\n")  # the key was already there
    (repo / "requirements.txt").write_text("requests==2.0\n# a comment only\n")
    (repo / "plain.py").write_text("a = 2\nkey = '-----BEGIN RSA PRIVATE KEY-----'\n")  # a new secret
    (repo / "link").unlink()
    (repo / "link").symlink_to("../../etc/passwd")
    (repo / "was_file").unlink()
    (repo / "was_file").symlink_to("/tmp")
    (repo / "new.bin").write_bytes(b"\0" * 100)
    head = commit_all(repo, "change")
    numstat = parse_numstat(git(repo, "diff-tree", "-r", "--numstat", "--no-renames", base, head))
    data = CheckpointCreated(
        n=2,
        ref="refs/corral/x/2",
        commit=head,
        tree=git(repo, "rev-parse", "HEAD^{tree}"),
        parent=base,
        trigger="demand",
        files=tuple(FileStat(path=f.path, added=f.added, deleted=f.deleted) for f in numstat),
        duration_ms=1.0,
    )
    policy = Policy()
    reader = ObjectReader(repo)
    try:
        full = reader.diff(base, head)
        lean = reader.diff(base, head, stats=recorded_stats(data))
        cache = FindingCache()
        expected = policy.check_files(full)
        assert policy.check_files(lean, cache=cache) == expected
        rules = {(v.path, v.rule) for v in expected}
        assert ("plain.py", "secret") in rules
        assert ("old_secret.py", "secret") not in rules
        assert ("link", "symlink_escape") in rules and ("was_file", "symlink_escape") in rules
        assert [(c.added, c.deleted, c.binary) for c in lean] == [(c.added, c.deleted, c.binary) for c in full]
        # Every file already judged: nothing is read, the same answer comes from the cache.
        known = reader.diff(
            base, head, stats=recorded_stats(data), known=lambda c: policy.file_key(c) in cache
        )
        assert all(c.added_text == "" for c in known)
        assert policy.check_files(known, cache=cache) == expected
    finally:
        reader.close()
