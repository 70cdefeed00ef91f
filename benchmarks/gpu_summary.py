"""The summary of benchmarks/gpu_check.sh: one table from its files, written as OUT/gpu_check.json."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(out: Path) -> None:
    summary: dict[str, object] = {}
    log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
    m = re.search(r"(\d+ passed[^\n]*|\d+ failed[^\n]*|skipped[^\n]*)", log)
    summary["tests"] = m.group(1) if m else "not run"
    plain, compiled = load(out / "bench.json") or {}, load(out / "bench_compile.json") or {}
    machine = plain.get("machine", {}) if isinstance(plain, dict) else {}
    summary["machine"] = machine
    rows = []
    for label, report in (("eager", plain), ("compile", compiled)):
        for r in (report.get("train") or []) if isinstance(report, dict) else []:
            rows.append({"mode": label, "preset": r["preset"], "batch": f"{r['batch_size']}x{r['context']}",
                         "dtype": r["dtype"], "tokens_per_sec": r["tokens_per_sec"], "mfu": r["mfu"],
                         "step_ms": 1000 * r["step_time"], "peak_mem_mb": r.get("peak_memory_mb")})
    summary["train"] = rows
    summary["dashboard"] = load(out / "dashboard.json")
    print(f"GPU check · {machine.get('gpu') or machine.get('device', '?')} · torch {machine.get('torch', '?')} · "
          f"{machine.get('date', '')}")
    print(f"tests: {summary['tests']}")
    print(f"{'mode':<8}{'preset':<8}{'BxT':>9}{'dtype':>6}{'tok/s':>12}{'MFU':>7}{'step':>10}{'peak mem':>11}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mem = f"{r['peak_mem_mb']:,.0f} MB" if r["peak_mem_mb"] else "-"
        print(f"{r['mode']:<8}{r['preset']:<8}{r['batch']:>9}{r['dtype']:>6}{r['tokens_per_sec']:>12,.0f}{mfu:>7}"
              f"{r['step_ms']:>8.1f}ms{mem:>11}")
    for d in summary["dashboard"] or []:
        print(f"dashboard {d['preset']} {d['mode']}: {d['tokens_per_sec']:,.0f} tok/s, {d['ratio']:.3f} of headless")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"written: {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check"))
