"""Removes the files a privilege-dropped portfwd created as root, once it has exited.

After `user = "nobody"`, portfwd can no longer unlink its control socket in /run/portfwd or a
Unix listener in a root-owned directory: unlinking needs write access to the directory, which
chown on the file does not give. So before dropping, portfwd starts this process (as root, in
a session of its own, so Ctrl-C and a SIGTERM to the process group pass it by) with the read
end of a pipe. It only waits: when portfwd exits, however it exits, the pipe reaches EOF, and
the janitor removes each file that is still the very socket portfwd made (same device and
inode: never a successor's), then the directories portfwd made that are now empty, and exits.

Run as `python -m portfwd.janitor FD JSON`: JSON is `{"files": [[path, dev, ino], ...],
"dirs": [path, ...]}`. Standard library only, so that it starts fast and imports nothing
that could fail after the parent's privileges are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys


def main(argv: list[str]) -> int:
    fd, plan = int(argv[0]), json.loads(argv[1])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    while True:  # EOF when every holder of the write end (portfwd) is gone
        try:
            if not os.read(fd, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    for path, device, inode in plan.get("files", []):
        with contextlib.suppress(OSError):
            found = os.lstat(path)
            if stat.S_ISSOCK(found.st_mode) and (found.st_dev, found.st_ino) == (device, inode):
                os.unlink(path)
    for path in plan.get("dirs", []):
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: another instance's socket keeps it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
