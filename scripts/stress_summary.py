"""Turn the figures ``tests/reliability`` records (``DCS_STRESS_OUT``) into the committed summary.

Usage: ``python scripts/stress_summary.py RAW.json OUT_DIR`` → ``OUT_DIR/summary.json`` and
``OUT_DIR/summary.md`` (cases tried, requests served, errors by code, max RSS, recovery time).
``make stress`` runs the suite and then this.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def summarize(raw: dict) -> dict:
    sections = raw.get("sections", {})
    overload = {k: v for k, v in sections.items() if k.startswith("overload")}
    main = overload.get("overload 30 s") or next(iter(overload.values()), {})
    return {
        "generated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "pytest": {"exit_status": raw.get("exitstatus"), "tests": raw.get("tests_collected"),
                   "failed": raw.get("tests_failed")},
        "fuzz_cases_total": raw.get("cases_total", 0),
        "fuzz_cases_by_rpc": raw.get("cases", {}),
        "requests_total": raw.get("requests_total", 0),
        "requests_ok": raw.get("requests_ok", 0),
        "errors_by_code": {k: v for k, v in sorted(raw.get("codes", {}).items()) if k != "OK"},
        "max_server_rss_mib": round(raw.get("max_rss_kib", 0) / 1024, 1),
        "overload": {
            "seconds": main.get("seconds"), "client_processes": main.get("client_processes"),
            "concurrent_streams": main.get("concurrent_streams"),
            "requests": main.get("requests"), "codes": main.get("codes"),
            "served_per_s": main.get("served_per_s"), "wrong_answers": main.get("wrong_answers"),
            "latency_ms": main.get("latency"),
            "rss_before_mib": round(main.get("rss_before_kib", 0) / 1024, 1),
            "rss_peak_mib": round(main.get("rss_peak_kib", 0) / 1024, 1),
            "recovery_s": main.get("recovery_s"),
            "baseline_p50_ms": main.get("baseline_p50_ms"),
            "after_p50_ms": main.get("after_p50_ms"),
        },
        "sections": sections,
    }


def to_markdown(s: dict) -> str:
    o = s["overload"]
    lines = [
        "# Stress summary (`make stress`)", "",
        (f"Generated {s['generated_utc']} at commit `{s['commit']}`"
        f"{' (uncommitted changes)' if s['tree_dirty'] else ''}; {s['machine']['cpus']} CPUs, "
        f"Python {s['machine']['python']}. pytest: {s['pytest']['tests']} tests, "
        f"{s['pytest']['failed']} failed (exit {s['pytest']['exit_status']})."), "",
        "| figure | value |", "|---|---|",
        f"| fuzz cases tried (all RPCs, both APIs, random bytes) | {s['fuzz_cases_total']} |",
        f"| requests made by the suite | {s['requests_total']} |",
        f"| requests served OK | {s['requests_ok']} |",
        f"| errors by code | {', '.join(f'{k} {v}' for k, v in s['errors_by_code'].items()) or 'none'} |",
        f"| max server RSS (VmHWM) | {s['max_server_rss_mib']} MiB |",
        (f"| overload | {o['seconds']} s, {o['client_processes']} client processes, "
        f"{o['concurrent_streams']} concurrent streams |"),
        f"| overload requests / served per s | {o['requests']} / {o['served_per_s']} |",
        f"| overload codes | {o['codes']} |",
        f"| overload wrong answers (vs in-process ORT) | {o['wrong_answers']} |",
        f"| overload latency ms (client side) | {o['latency_ms']} |",
        f"| server RSS before / peak under load | {o['rss_before_mib']} / {o['rss_peak_mib']} MiB |",
        (f"| recovery to normal latency | {o['recovery_s']} s (p50 {o['baseline_p50_ms']} ms before, "
        f"{o['after_p50_ms']} ms after) |"),
        "", "## Fuzz cases by RPC", "", "| RPC | cases |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(s["fuzz_cases_by_rpc"].items())]
    lines += ["", "## Per test figures", ""]
    for name, fig in sorted(s["sections"].items()):
        if name.startswith("fuzz "):
            continue
        lines.append(f"- **{name}**: `{json.dumps(fig, sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    raw_path, out = Path(argv[0]), Path(argv[1])
    if not raw_path.is_file():
        print(f"stress_summary: {raw_path} not found (did the suite run with DCS_STRESS_OUT?)",
              file=sys.stderr)
        return 1
    s = summarize(json.loads(raw_path.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    (out / "summary.md").write_text(to_markdown(s))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
