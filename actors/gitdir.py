"""A linked worktree's gitdir, read from its `.git` file (no git process, no other Corral module).

Kept apart from actors/worktree.py so that modules below it (actors/checkpoints.py) can read it
without an import circle (worktree -> shadow -> checkpoints).
"""

from pathlib import Path


def linked_gitdir(worktree: str | Path) -> Path | None:
    """The gitdir a linked worktree's `.git` file names (`gitdir: PATH`, absolute or relative to the
    worktree), resolved; None when `.git` is not such a file (a whole repository's directory, none)
    or cannot be read."""
    link = Path(worktree) / ".git"
    try:
        text = link.read_text(errors="replace").strip() if link.is_file() else ""
    except OSError:
        return None
    return (Path(worktree) / text.split(":", 1)[1].strip()).resolve() if text.startswith("gitdir:") else None
