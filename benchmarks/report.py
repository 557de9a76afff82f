"""Turn pytest-benchmark JSON into a markdown table and a bar chart under benchmarks/results/.

    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json            # -> results/<machine>-<date>.md/.png

The files are named by machine and date (``cpu-2core-epyc-2026-11-27``); the markdown names
the machine (CPU model, cores, torch version) and checks the issue's CPU targets.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MEZO = "mezo-loop"


# -- reading ----------------------------------------------------------------------------------

def load(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if "benchmarks" not in data or "machine_info" not in data:
        raise ValueError(f"{path} is not pytest-benchmark JSON (no 'benchmarks'/'machine_info')")
    return data


def machine(data: dict) -> dict:
    mi = data["machine_info"]
    zo = mi.get("zo_opt", {})
    cpu = zo.get("cpu_model") or mi.get("cpu", {}).get("brand_raw") or mi.get("processor") or "unknown CPU"
    return {
        "cpu_model": cpu,
        "cores": zo.get("cores") or mi.get("cpu", {}).get("count"),
        "torch": zo.get("torch", "?"),
        "torch_threads": zo.get("torch_threads"),
        "python": mi.get("python_version", "?"),
        "zo_opt": zo.get("zo_opt", "?"),
        "backends": zo.get("backends", []),
        "skipped_backends": zo.get("skipped_backends", {}),
        "cuda_device": zo.get("cuda_device"),
        "date": data.get("datetime", "")[:10] or "undated",
    }


def cpu_slug(cpu_model: str) -> str:
    """'AMD EPYC 7B13 64-Core Processor' -> 'epyc-7b13'; 'Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz'
    -> 'xeon-gold-6338'."""
    s = re.sub(r"\(r\)|\(tm\)|@.*$|\bcpu\b|\bprocessor\b|\d+-core|\bamd\b|\bintel\b", " ",
               cpu_model.lower())
    words = re.findall(r"[a-z0-9]+", s)
    return "-".join(words[:3]) or "cpu"


def report_name(data: dict) -> str:
    m = machine(data)
    if m["cuda_device"]:
        head = re.sub(r"[^a-z0-9]+", "-", m["cuda_device"].lower()).strip("-")
    else:
        head = f"cpu-{m['cores']}core-{cpu_slug(m['cpu_model'])}"
    return f"{head}-{m['date']}"


def rows(data: dict) -> dict[str, list[dict]]:
    """Benchmarks by kind ('pass', 'step', 'memory'), each a flat dict."""
    out: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        info, stats = b.get("extra_info", {}), b["stats"]
        row = dict(info, group=b.get("group") or "", name=b["name"], median=stats["median"],
                   min=stats["min"], rounds=stats["rounds"])
        kind = ("memory" if "peak_extra_bytes" in info else "step" if "outside_share" in info
                else "pass" if "bytes" in info else "other")
        out[kind].append(row)
    return out


# -- tables -----------------------------------------------------------------------------------

def _impl_label(r: dict) -> str:
    d = r.get("distribution", "gaussian")
    return r["impl"] if d == "gaussian" or r["impl"] == "copy" else f"{r['impl']} ({d})"


def pass_table(passes: list[dict]) -> list[str]:
    lines = ["| parameters | dtype | implementation | median ms | GB/s | % of copy | speed-up vs MeZO-style loop |",
             "|---|---|---|---:|---:|---:|---:|"]
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    for r in passes:
        by_group[(r["size"], r["dtype"])].append(r)
    for (size, dtype), rs in sorted(by_group.items(), key=lambda kv: (_size_key(kv[0][0]), kv[0][1] != "float32")):
        copy = next((r for r in rs if r["impl"] == "copy"), None)
        mezo = next((r for r in rs if r["impl"] == MEZO), None)
        for r in sorted(rs, key=lambda r: r["median"]):
            gbs = r["bytes"] / r["median"] / 1e9
            pct = f"{100 * copy['median'] / r['median']:.0f}%" if copy else "-"
            up = _times(mezo["median"] / r["median"]) if mezo and r["impl"] != "copy" else "-"
            lines.append(f"| {size} | {dtype} | {_impl_label(r)} | {1e3 * r['median']:.1f} | "
                         f"{gbs:.3g} | {pct} | {up} |")
    return lines


def step_table(steps: list[dict]) -> list[str]:
    lines = ["| q | implementation | s/step | forwards s/step | outside forwards s/step | share outside forwards | speed-up vs MeZO-style loop (step / outside part) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    by_q: dict[int, list[dict]] = defaultdict(list)
    for r in steps:
        by_q[r["q"]].append(r)
    for q, rs in sorted(by_q.items()):
        mezo = next((r for r in rs if r["impl"] == MEZO), None)
        for r in sorted(rs, key=lambda r: r["median"]):
            step_s = r["forward_s_per_step"] + r["outside_s_per_step"]
            up = "-"
            if mezo and r["impl"] != MEZO:
                m_step = mezo["forward_s_per_step"] + mezo["outside_s_per_step"]
                up = f"{m_step / step_s:.2f}x / {mezo['outside_s_per_step'] / max(r['outside_s_per_step'], 1e-9):.1f}x"
            lines.append(f"| {q} | {r['impl']} | {step_s:.3f} | {r['forward_s_per_step']:.3f} | "
                         f"{r['outside_s_per_step']:.3f} | {100 * r['outside_share']:.1f}% | {up} |")
    return lines


def memory_table(mem: list[dict]) -> list[str]:
    lines = ["| implementation | peak extra bytes | % of parameter bytes |", "|---|---:|---:|"]
    for r in sorted(mem, key=lambda r: r["peak_extra_bytes"]):
        lines.append(f"| {r['impl']} | {_bytes(r['peak_extra_bytes'])} | {100 * r['peak_extra_share']:.4g}% |")
    return lines


def targets(kinds: dict[str, list[dict]]) -> list[str]:
    """The CPU targets of the benchmark issue, where the rows exist."""
    out = []
    p = {(r["impl"], r.get("distribution", "gaussian")): r for r in kinds.get("pass", [])
         if r["size"] == "20M" and r["dtype"] == "float32"}
    fused = next((r for (impl, d), r in p.items() if impl in ("zo-opt[cpu]",) and d == "gaussian"), None)
    if fused and (MEZO, "gaussian") in p:
        x = p[(MEZO, "gaussian")]["median"] / fused["median"]
        out.append(f"- Fused CPU pass vs MeZO-style loop, GPT-2 20M float32 (Gaussian): **{x:.1f}x** "
                   f"(target >= 4x: {'met' if x >= 4 else 'missed'})")
    for r in kinds.get("step", []):
        if r["q"] == 4 and r["impl"].startswith("zo-opt["):
            s = 100 * r["outside_share"]
            out.append(f"- ZO step q=4, GPT-2 20M, {r['impl']}: **{s:.1f}%** of the step outside the "
                       f"forwards (target < 10%: {'met' if s < 10 else 'missed'})")
        if r["q"] == 4 and r["impl"] == MEZO:
            out.append(f"- ZO step q=4, MeZO-style loop: {100 * r['outside_share']:.1f}% outside the forwards")
    for r in kinds.get("memory", []):
        s = 100 * r["peak_extra_share"]
        if r["impl"].startswith("zo-opt["):
            out.append(f"- Peak extra memory of a step, {r['impl']}: **{s:.4g}%** of the parameter bytes "
                       f"(target < 1%: {'met' if s < 1 else 'missed'})")
        elif r["impl"] == "old-loop":
            out.append(f"- Peak extra memory of a step, old loop: **{s:.0f}%** (expected > 200%: "
                       f"{'yes' if s > 200 else 'no'})")
        else:
            out.append(f"- Peak extra memory of a step, {r['impl']}: {s:.0f}%")
    return out


def markdown(data: dict, source: str = "", note: str = "") -> str:
    m = machine(data)
    kinds = rows(data)
    title = m["cuda_device"] or f"{m['cpu_model']}, {m['cores']} cores"
    lines = [f"# zo-opt benchmarks: {title}, {m['date']}", "",
             f"- Machine: {m['cpu_model']}, {m['cores']} cores (torch threads: {m['torch_threads']})"
             + (f", GPU {m['cuda_device']}" if m["cuda_device"] else ""),
             f"- Software: torch {m['torch']}, Python {m['python']}, zo-opt {m['zo_opt']}; "
             f"backends benchmarked: {', '.join(m['backends']) or '?'}"]
    for b, why in m["skipped_backends"].items():
        lines.append(f"- Not benchmarked: {b} ({why})")
    lines.append("- Command: `python -m pytest benchmarks --benchmark-only --benchmark-json=...`, "
                 f"then `python benchmarks/report.py`{f' ({source})' if source else ''}")
    if note:
        lines.append(f"- Note: {note}")
    tg = targets(kinds)
    if tg:
        lines += ["", "## Targets", "", *tg]
    if kinds.get("pass"):
        lines += ["", "## One pass over the parameters (`theta += eps * z`, in place)", "",
                  "GB/s counts one read and one write of every parameter byte for every row; "
                  "`copy` copies the same number of bytes (the bandwidth ceiling). Gaussian "
                  "directions unless marked.", "", *pass_table(kinds["pass"])]
    if kinds.get("step"):
        g = kinds["step"][0]["group"]
        detail = g[g.index("(") + 1:-1] if "(" in g else ""
        lines += ["", f"## One ZO step, central differences, q directions = 2q forwards ({detail})", "",
                  "The forwards are timed inside the closure; the rest of the step (perturbations, "
                  "restores, update, syncs) is 'outside'.", "", *step_table(kinds["step"])]
    if kinds.get("memory"):
        g = kinds["memory"][0]["group"]
        lines += ["", f"## {g[0].upper() + g[1:]}", "",
                  "Bytes allocated above the parameters during one step whose loss reads one "
                  "element (so only the optimizer's own memory counts).", "",
                  *memory_table(kinds["memory"])]
    return "\n".join(lines) + "\n"


# -- chart ------------------------------------------------------------------------------------

def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = rows(data)
    panels = [k for k in ("pass", "step", "memory") if kinds.get(k)]
    if not panels:
        raise ValueError("no pass, step or memory benchmarks in the JSON")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        rs = kinds[kind]
        if kind == "pass":
            rs = sorted(rs, key=lambda r: (_size_key(r["size"]), r["dtype"] != "float32", -r["median"]))
            labels = [f"{r['size']} {r['dtype']} {_impl_label(r)}" for r in rs]
            vals = [r["bytes"] / r["median"] / 1e9 for r in rs]
            ax.barh(labels, vals, color=[_color(r["impl"]) for r in rs])
            ax.set_xscale("log")
            ax.set_xlabel("GB/s (2 x parameter bytes / time), log scale")
            ax.set_title("One pass over the parameters")
        elif kind == "step":
            rs = sorted(rs, key=lambda r: (r["q"], r["impl"]))
            labels = [f"q={r['q']} {r['impl']}" for r in rs]
            fwd = [r["forward_s_per_step"] for r in rs]
            out = [r["outside_s_per_step"] for r in rs]
            from matplotlib.patches import Patch

            ax.barh(labels, fwd, color="#bbbbbb")
            ax.barh(labels, out, left=fwd, color=[_color(r["impl"]) for r in rs])
            ax.set_xlabel("seconds per step")
            ax.set_title("One ZO step")
            ax.legend(handles=[Patch(color="#bbbbbb", label="forwards"),
                               Patch(color="#444444", label="outside the forwards")],
                      loc="lower right")
        else:
            rs = sorted(rs, key=lambda r: r["peak_extra_share"])
            labels = [r["impl"] for r in rs]
            vals = [100 * r["peak_extra_share"] for r in rs]
            ax.barh(labels, vals, color=[_color(r["impl"]) for r in rs])
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlabel("% of parameter bytes (symlog)")
            ax.set_title("Peak extra memory of a step")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    m = machine(data)
    fig.suptitle(f"zo-opt: {m['cuda_device'] or m['cpu_model']}, {m['cores']} cores, torch {m['torch']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _color(impl: str) -> str:
    if impl == "copy":
        return "#7f7f7f"
    if impl == MEZO:
        return "#d62728"
    if impl == "old-loop":
        return "#ff7f0e"
    return "#1f77b4"


def _size_key(size: str) -> float:
    n = float(re.sub(r"[^0-9.]", "", size) or 0)
    return n * (1000 if size.upper().endswith("B") else 1)


def _times(x: float) -> str:
    return f"{x:.1f}x" if x >= 0.1 else f"{x:.2g}x"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def free_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-runN`` with the first N from 2 whose table and chart are not there:
    a second run on the same machine and day overwrote the first's files."""
    def taken(name):
        return (out / f"{name}.md").exists() or (out / f"{name}.png").exists()

    n, name = 2, stem
    while taken(name):
        name, n = f"{stem}-run{n}", n + 1
    return name


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", help="file stem (default: <machine>-<date>; -run2, -run3... where taken)")
    ap.add_argument("--note", default="", help="a line about the conditions of the run")
    args = ap.parse_args(argv)
    data = load(args.json)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out, args.name or report_name(data))
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    md.write_text(markdown(data, Path(args.json).name, args.note))
    chart(data, png)
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return [md, png]


if __name__ == "__main__":
    main()
