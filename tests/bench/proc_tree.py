#!/usr/bin/env python3
"""Memory and CPU of a process and all its descendants, as one JSON object on stdout.

    proc_tree.py PID

{"pids": [...], "rss_kib": sum VmRSS, "hwm_kib": sum VmHWM (peak RSS), "pss_kib": sum Pss
(smaps_rollup; shared pages split between the processes sharing them), "cpu_s": sum of user+system
CPU seconds}. Descendants are found by scanning /proc/*/stat for parent pids, so nginx's and
haproxy's workers are included. Standard library only; Linux only.
"""

import json
import os
import sys


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # The command name is in parentheses and may contain spaces.
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    return rest


def tree(root):
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(stat_fields(name)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    root = int(sys.argv[1])
    tick = os.sysconf("SC_CLK_TCK")
    pids = [p for p in tree(root) if os.path.exists(f"/proc/{p}")]
    cpu = 0.0
    for p in pids:
        try:
            f = stat_fields(p)
            if f[0] == "Z":
                continue
            cpu += (int(f[11]) + int(f[12])) / tick  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            pass
    print(
        json.dumps(
            {
                "pids": pids,
                "rss_kib": sum(status_kib(p, "VmRSS") for p in pids),
                "hwm_kib": sum(status_kib(p, "VmHWM") for p in pids),
                "pss_kib": sum(pss_kib(p) for p in pids),
                "cpu_s": round(cpu, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
