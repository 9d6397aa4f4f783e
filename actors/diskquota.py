"""Disk quotas the kernel enforces: an execution's worktree on an ext4 file system of its size.

`corral run --disk N` used to be a poll of the worktree's size every 2 s: an agent wrote 1.1 GB
before it was paused, and a 2 GB `posix_fallocate` landed in full. Here, when the machine allows
it (root, loop devices, mkfs.ext4), the worktree directory is the mount point of its own file
system before `git worktree add` checks out into it:

    $CORRAL_HOME/disks/<worktree name>.img   a sparse file (only what is written takes disk)
    mkfs.ext4 -m 0 ...                        no reserved blocks; sized so that the space usable
                                              is the limit plus one block (below)
    mount -o loop,nosuid,nodev IMAGE WORKTREE then lost+found is removed: git wants it empty

so a write past the limit fails inside the agent with ENOSPC, fallocate included, and nothing
the agent does can use more. The shim still records `limit.exceeded` (limit `disk`) when the
file system is full, from one statvfs per poll (`usage`) instead of walking the tree.

Sizing: ext4 keeps part of an image for itself (inode tables, bitmaps, the journal, and the
clusters the kernel holds back at mount: 2 %, at most 4,096) and that part is not the agent's.
The image is made larger by exactly that: mkfs is run, the free blocks are read back from the
superblock, and the image is grown (rarely twice) until the usable space is at least the limit
plus one block. "Past the limit" then means one block past it, as with the poll it replaces.
The inode ratio is one inode per block, so a tree of small files never runs out of inodes
before it runs out of blocks.

Large folios: since Linux 6.16 ext4 caches a file's pages in folios of up to 2 MiB, and a write
whose next folio does not fit fails whole: a 4 MB write into a 1 MB quota wrote nothing and left
the file system looking 1 MB free, so "is it full?" could not tell a refused write. ext4 keeps
large folios off for a file system with the `verity` feature (a flag only; no file here is a
verity file), so the image is made with it: writes then fill the quota to its last block before
ENOSPC, and a full file system means a refused write. A kernel that will not mount it gets an
image without it.

The mount goes with the worktree (`release`, from actors/worktree.py `remove_worktree`). After a
reboot the images are still there and the mounts are not: `remount_all` (the spawner's start,
`corral worktrees`) mounts the image of every worktree directory still present, after
`e2fsck -p`, and removes images whose worktree is gone.

Without root or loop devices (or with $CORRAL_DISK_QUOTA=poll) `unavailable()` says why, and
the shim polls as before; `describe()` is what `corral status` shows.
"""

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from actors.errors import WorkspaceError

ENV: Final = "CORRAL_DISK_QUOTA"  # "poll": no images even where they could be made (the poll of old)
BLOCK: Final = 4096
IMAGE_SUFFIX: Final = ".img"
KERNEL: Final = "kernel quota (loop ext4)"
POLLED: Final = "polled every 2 s"
MOUNT_OPTIONS: Final = "loop,nosuid,nodev,noatime"
JOURNAL_FROM: Final = 16 << 20  # smaller file systems get no journal (mke2fs refuses one below 2,048 blocks)
FULL_MARGIN: Final = 2 * BLOCK  # less free than this after a refused write: the file system is full
RESERVE_CAP: Final = 4096  # clusters the kernel holds back at mount: 1/50 of the blocks, at most this
ORPHAN_AGE_S: Final = 60.0  # an image without its worktree is removed once it is this old (not being made)
_SUPERBLOCK: Final = 1024
_INCOMPAT_64BIT: Final = 0x80


class DiskQuotaError(WorkspaceError):
    """An image could not be made, mounted or removed."""


@functools.cache
def unavailable() -> str | None:
    """Why this machine cannot give worktrees a kernel quota, or None when it can."""
    if os.environ.get(ENV, "").strip().lower() == "poll":
        return f"${ENV} is poll"
    if os.geteuid() != 0:
        return "not root: loop mounts need CAP_SYS_ADMIN"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    for tool in ("mkfs.ext4", "mount", "umount", "e2fsck"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install e2fsprogs mount)"
    return None


def describe(worktree: str | Path | None = None) -> str:
    """How a disk limit is enforced: for one worktree (is it on its own mount?) or on this machine."""
    if worktree is not None:
        return KERNEL if is_mounted(Path(worktree)) else POLLED
    return KERNEL if unavailable() is None else POLLED


def image_of(worktree: Path) -> Path:
    """The image of a worktree: `disks/` beside the directory holding the worktrees ($CORRAL_HOME)."""
    return worktree.parent.parent / "disks" / f"{worktree.name}{IMAGE_SUFFIX}"


def is_mounted(path: Path) -> bool:
    """Whether `path` is a mount point (one stat of it and of its parent)."""
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def _loop_mount_of(worktree: Path, image: Path) -> bool:
    """Whether the worktree is the mount of a loop device backed by this image (nothing else is unmounted)."""
    target = os.fsencode(os.path.abspath(worktree))
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 10 or _unescape(fields[4]) != target:
            continue
        source = fields[fields.index(b"-") + 2] if b"-" in fields else b""
        if not source.startswith(b"/dev/loop"):
            continue
        backing = Path("/sys/block", os.fsdecode(source[5:]), "loop", "backing_file")
        with contextlib.suppress(OSError):
            name = backing.read_text().strip().removesuffix(" (deleted)")
            if name == os.path.realpath(image):
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    for code in (b"\\040", b"\\011", b"\\012", b"\\134"):
        field = field.replace(code, bytes([int(code[1:], 8)]))
    return field


# --- making and removing ------------------------------------------------------------------------


def create(worktree: Path, limit: int) -> Path:
    """Make the worktree directory the mount of a new ext4 image of `limit` bytes; return the image.

    The directory must not exist yet, or be empty. On failure nothing is left (no image, no mount).
    """
    image = image_of(worktree)
    image.parent.mkdir(parents=True, exist_ok=True)
    worktree.mkdir(parents=True, exist_ok=True)
    if any(worktree.iterdir()):
        raise DiskQuotaError(str(worktree), "exists and is not empty: cannot mount its disk quota there")
    try:
        format_image(image, limit)
        try:
            _mount(image, worktree)
        except DiskQuotaError:  # a kernel that will not mount the verity feature: without it
            format_image(image, limit, verity=False)
            _mount(image, worktree)
        with contextlib.suppress(FileNotFoundError):
            (worktree / "lost+found").rmdir()
    except BaseException:
        release(worktree)
        raise
    return image


def release(worktree: Path) -> bool:
    """Unmount a worktree's image and delete it; True if it had one (mounted or not).

    A mount still in use (a process left with its cwd there) is detached lazily: it disappears
    from the tree at once and the kernel frees it when the last user goes. The directory itself
    is removed when empty.
    """
    image = image_of(worktree)
    had = False
    if _loop_mount_of(worktree, image):
        had = True
        done = _run(["umount", str(worktree)])
        if done.returncode != 0:
            lazy = _run(["umount", "-l", str(worktree)])
            if lazy.returncode != 0:
                raise DiskQuotaError(str(worktree), f"cannot unmount its disk quota: {_last_line(lazy.stderr)}")
    if image.exists():
        had = True
        image.unlink()
    if had:
        with contextlib.suppress(OSError):
            worktree.rmdir()
    return had


def quota_mounts(root: Path) -> list[Path]:
    """The mount points under `root` that are loop mounts of their own disk-quota image."""
    prefix = os.fsencode(os.path.realpath(root)) + b"/"
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().splitlines():
            fields = line.split(b" ")
            point = _unescape(fields[4]) if len(fields) > 4 else b""
            if point.startswith(prefix):
                path = Path(os.fsdecode(point))
                if _loop_mount_of(path, image_of(path)):
                    found.append(path)
    return found


def release_all(root: Path) -> list[Path]:
    """Release every disk-quota mount under `root` (its image too); return the worktrees released."""
    released = quota_mounts(root)
    for worktree in released:
        release(worktree)
    return released


def remount(worktree: Path) -> bool:
    """Mount a worktree's image again (after a reboot); True if it was mounted now."""
    image = image_of(worktree)
    if not image.is_file() or is_mounted(worktree) or not worktree.is_dir():
        return False
    with open(image, "rb") as held:
        # corral up's spawner, its checkpointer and `corral worktrees` may all try at once
        fcntl.flock(held, fcntl.LOCK_EX)
        if is_mounted(worktree):
            return False
        # -p: fix what is safe to fix unattended; 0 clean, 1 fixed, 2 fixed (reboot: not for an image)
        check = _run(["e2fsck", "-p", str(image)])
        if check.returncode > 2:
            raise DiskQuotaError(str(worktree), f"its disk image needs a manual fsck: e2fsck {image}")
        _mount(image, worktree)
    return True


def remount_all(worktrees: Path) -> list[Path]:
    """Remount every image whose worktree directory is there; remove images whose worktree is gone.

    Returns the worktrees mounted now. Nothing to do (the usual case) costs one directory listing.
    """
    disks = worktrees.parent / "disks"
    if unavailable() is not None or not disks.is_dir():
        return []
    mounted = []
    now = time.time()
    for image in sorted(disks.glob(f"*{IMAGE_SUFFIX}")):
        worktree = worktrees / image.name.removesuffix(IMAGE_SUFFIX)
        if worktree.is_dir():
            try:
                if remount(worktree):
                    mounted.append(worktree)
            except DiskQuotaError as exc:  # one damaged image must not keep the others (or corral up) down
                sys.stderr.write(f"corral: {exc}\n")
        elif now - image.stat().st_mtime > ORPHAN_AGE_S:
            image.unlink(missing_ok=True)
    return mounted


def full(worktree: Path, maximum: int) -> int | None:
    """The bytes used, when the worktree's file system is past `maximum` or has no block left
    (a write was refused: ENOSPC); None while there is room. One statvfs."""
    used, usable = usage(worktree)
    return used if used > maximum or usable - used < FULL_MARGIN else None


def usage(worktree: Path) -> tuple[int, int]:
    """(bytes used, bytes usable in all) of the file system mounted at the worktree: one statvfs."""
    st = os.statvfs(worktree)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return used, used + st.f_bavail * st.f_frsize


# --- the image ------------------------------------------------------------------------------------


def format_image(image: Path, limit: int, *, verity: bool = True) -> int:
    """Make `image` an ext4 file system whose usable space is at least limit + one block; return its size.

    mke2fs's overhead is not a formula worth keeping in step with e2fsprogs: it is read back from
    the superblock after each mkfs (a sparse image formats in a few milliseconds) and the image is
    grown by what is missing, divided by the share of each added byte that stays usable.
    """
    target = -(-limit // BLOCK) * BLOCK + BLOCK
    slack = max(8 * BLOCK, limit // 2000)  # "about the limit": at most 0.05 % (or 32 KiB) more
    journal = _journal_bytes(limit) if limit >= JOURNAL_FROM else 0
    size = _round((target + journal + RESERVE_CAP * BLOCK * (target > 700 << 20)) / _share(target))
    best = None
    for _ in range(8):
        _mkfs(image, size, journal=journal, verity=verity)
        usable = _usable_after_mount(image)
        if target <= usable <= target + slack:
            return size
        if usable >= target and (best is None or size < best):
            best = size
        size = _round(size + (target - usable) / _share(size))
    if best is None:
        raise DiskQuotaError(str(image), f"cannot size an ext4 image for {limit} bytes")
    _mkfs(image, best, journal=journal, verity=verity)
    return best


def _share(size: float) -> float:
    """The share of an image's bytes an agent can use: less an inode (256 of 4,096) per block, and
    the kernel's 2 % held back while that is below its cap."""
    return 1 - 256 / BLOCK - 0.0005 - (0.02 if size / BLOCK / 50 < RESERVE_CAP else 0)


def _journal_bytes(limit: int) -> int:
    """The journal: 4 MiB (mke2fs's minimum with 4 KiB blocks), 16 MiB from 1 GiB, 64 MiB from 16 GiB."""
    if limit >= 16 << 30:
        return 64 << 20
    if limit >= 1 << 30:
        return 16 << 20
    return 4 << 20


def _round(size: float) -> int:
    return -(-int(size) // BLOCK) * BLOCK


def _mkfs(image: Path, size: int, *, journal: int, verity: bool) -> None:
    # a fresh sparse file (nothing of an earlier attempt stays), readable by Corral's user only:
    # it holds the worktree's files
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    command = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-m", "0",  # no blocks reserved for root: every block is the agent's
        "-b", str(BLOCK),
        "-I", "256",
        "-i", str(BLOCK),  # an inode per block: small files never run out of inodes first
        "-O", ",".join(["^resize_inode", *(["verity"] if verity else []), *([] if journal else ["^has_journal"])]),
        "-E", "assume_storage_prezeroed=1,nodiscard",  # a sparse file reads zeros: nothing to write
        "-L", "corral-quota",
    ]  # fmt: skip
    if journal:
        command += ["-J", f"size={journal >> 20}"]
    done = _run([*command, str(image)])
    if done.returncode != 0:
        raise DiskQuotaError(str(image), f"mkfs.ext4 failed: {_last_line(done.stderr)}")


def _usable_after_mount(image: Path) -> int:
    """The bytes an agent can write once the image is mounted and lost+found removed.

    The superblock's free blocks, less what the kernel holds back at mount for extent conversions
    (ext4_calculate_resv_clusters: 1/50 of the blocks, at most 4,096), plus lost+found's blocks.
    """
    with open(image, "rb") as f:
        f.seek(_SUPERBLOCK)
        sb = f.read(1024)

    def field(offset: int) -> int:
        return int(struct.unpack_from("<I", sb, offset)[0])

    blocks, free, log_block = field(4), field(12), field(24)
    if field(0x60) & _INCOMPAT_64BIT:
        blocks |= field(0x150) << 32
        free |= field(0x158) << 32
    block = 1024 << log_block
    lost_found = 16384 // block  # mke2fs makes it 16 KiB (or one block if larger)
    return (free - min(blocks // 50, RESERVE_CAP) + max(lost_found, 1)) * block


def _mount(image: Path, worktree: Path) -> None:
    done = _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(worktree)])
    if done.returncode != 0:
        reason = _last_line(done.stderr)
        if "loop" in reason.lower() or done.returncode == errno.EBUSY:
            reason += " (no free loop device? see losetup -a)"
        raise DiskQuotaError(str(worktree), f"cannot mount its disk quota: {reason}")


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"
