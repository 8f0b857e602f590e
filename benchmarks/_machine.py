"""The machine description every benchmark result records."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    """CPU model, core count, platform, JAX version and default device."""
    import jax

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
    }


def one_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['backend']} ({m['device']}), "
            f"jax {m['jax']}, Python {m['python']}")


def write_results(out: str, stem: str, results: dict, markdown: str) -> None:
    """Writes ``out/stem.json`` (the results) and ``out/stem.md`` (the table)."""
    import json

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown)


def proc_status() -> dict:
    """This process's ``VmRSS`` and ``VmHWM`` (peak RSS) in bytes; ``{}`` off Linux."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024  # kB -> bytes
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
