"""Process-memory helpers shared by the benchmarks (Linux ``/proc``; graceful no-ops elsewhere)."""

from __future__ import annotations

import ctypes
import gc

__all__ = ["meminfo_kib", "status_kib", "reset_peak_rss", "malloc_trim", "settle_and_reset_peak"]


def _proc_kib(path: str, field: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``"VmRSS"``, ``"VmHWM"``), or None where unavailable."""
    return _proc_kib("/proc/self/status", field)


def meminfo_kib(field: str) -> int | None:
    """A ``/proc/meminfo`` field in KiB (``"MemAvailable"``), or None where unavailable."""
    return _proc_kib("/proc/meminfo", field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM := VmRSS) via ``/proc/self/clear_refs``; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so the next peak measures new allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle_and_reset_peak() -> bool:
    """gc + malloc_trim, then :func:`reset_peak_rss`."""
    gc.collect()
    malloc_trim()
    return reset_peak_rss()


def write_results(out_dir, stem: str, result: dict, markdown: str) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` and print the markdown (every benchmark's
    last step)."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print()
    print(markdown)
    print(f"wrote {out / (stem + '.json')} and .md")
