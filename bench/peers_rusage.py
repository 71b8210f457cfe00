"""Run one command and report its wall time and peak RSS, free of the caller's own memory.

Linux carries a process's peak-RSS mark across fork and exec: a child spawned from the benchmark
harness (whose resident set holds its imports and I/O buffers) starts its ``ru_maxrss`` at the
harness's size, so a small tool would be reported as large as the harness. bench_peers.py therefore
starts each run through this small launcher (``python -S -I``, ~9 MiB, below any measured tool),
which forks and execs the command and reads the child's rusage with ``wait4``.

Prints ``SECONDS MAXRSS_BYTES`` on stdout (the command's own stdout is discarded) and exits with
the command's exit code. Usage: python -S -I peers_rusage.py CMD [ARG...]
"""

import os
import sys
import time


def main(cmd: list[str]) -> int:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: the command, with stdout to /dev/null so only our line reaches the caller
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, rusage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    print(f"{elapsed:.6f} {rusage.ru_maxrss * 1024}")  # Linux reports KiB
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
