"""Reports over result rows (a sweep folder or a results.jsonl): best run per method by SPEC's selection
score, the method table, the paper-style scatter of relative change in memorization vs in utility, and
memorization over unlearning epochs -- as Markdown + PNG and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import defaultdict

from ..common.optional import pyplot
from ..tinymem.results import row_utility_key

CATEGORY_ORDER = {"regularizer": 0, "fine-tuning": 1, "neuron": 2, "weight": 3}


def _setting(row: dict) -> str:
    """What a best run is chosen within: the trained run, and the checkpoint when it is not the final one
    (the paper's protocol unlearns several checkpoints of a run and reports each)."""
    base = row.get("model_dir") or row["model"]
    ck = row.get("checkpoint") or "final"
    return base if ck == "final" else f"{base} @ {ck}"


def best_runs(rows: list[dict], perp_cutoff: float = 500.0, mem_cutoff: float = 100.0, *,
              utility_metric: str | None = None, mem_metric: str | None = None) -> dict:
    """(setting, method) -> best row: lowest score among runs with perplexity < perp_cutoff (language)
    and % memorized < mem_cutoff. Runs that destroyed the model (NaN/inf utility) never win.

    ``utility_metric`` / ``mem_metric``: score every row again with these selection variants (None: the
    score each row recorded, which follows its run's protocol section)."""
    from ..tinymem.results import rescore

    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        r = rescore(r, utility_metric, mem_metric)
        ua = r["utility_after"]
        ppl = row_utility_key(r) if row_utility_key(r).startswith("ppl") else "ppl_token"
        if ppl in ua and not (ua[ppl] < perp_cutoff):
            continue
        if not r["mem_after"] < mem_cutoff or r["score"] != r["score"]:
            continue
        k = (_setting(r), r["method"])
        if k not in best or r["score"] < best[k]["score"]:
            best[k] = r
    return best


def _defaults(method: str) -> dict:
    import dataclasses

    from ..methods import get_method

    try:
        return dataclasses.asdict(get_method(method).config_cls())
    except ValueError:  # regularizers and fine-tuning: their settings are all shown
        return {}


def _fmt_hp(hp: dict, method: str = "") -> str:
    """The settings that say what the run was: ratio and epochs always, others where not the default."""
    default = _defaults(method)
    keep = {k: v for k, v in hp.items() if k not in ("batch_size", "loss_on_pad", "seed", "progress")
            and (k in ("ratio", "epochs") or k not in default or default[k] != v)}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())


def table(rows: list[dict], best: dict) -> list[dict]:
    """One record per (setting, method), sorted by setting then score; the utility shown is the one the
    best run was selected on."""
    n_runs = defaultdict(int)
    for r in rows:
        n_runs[(_setting(r), r["method"])] += 1
    out = []
    for (setting, method), r in best.items():
        uk = row_utility_key(r)
        out.append({
            "setting": setting, "method": method, "category": r.get("category", ""),
            "runs": n_runs[(setting, method)],
            "settings": _fmt_hp(r.get("grid_point") or r["hparams"], method),
            "mem_before": r["mem_before"], "mem_after": r["mem_after"], "d_mem": r["d_mem"],
            "util_name": {"acc": "accuracy %", "acc_paper": "accuracy % (pads in)",
                          "ppl_batchmean": "perplexity (batch mean)"}.get(uk, "perplexity"),
            "util_before": r["utility_before"][uk] * (100 if uk.startswith("acc") else 1),
            "util_after": r["utility_after"][uk] * (100 if uk.startswith("acc") else 1),
            "checkpoint": r.get("checkpoint") or "final", "n_retain": r.get("n_retain"),
            "selection": r.get("selection"),
            "d_util": r["d_util"], "score": r["score"], "seconds": r.get("time_method_s") or 0.0,
        })
    out.sort(key=lambda t: (t["setting"], t["score"]))
    return out


def _secs(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def markdown_table(records: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(t["setting"] for t in records):
        recs = [t for t in records if t["setting"] == setting]
        un = recs[0]["util_name"]
        lines += [f"**{os.path.basename(setting.rstrip('/')) or setting}** "
                  f"(base: {recs[0]['mem_before']:.1f}% memorized, {un} {recs[0]['util_before']:.2f})", "",
                  f"| method | category | runs | best settings | mem % | Δmem | {un} | Δ{un.split()[0]} "
                  "| score | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t in recs:
            lines.append(f"| {t['method']} | {t['category']} | {t['runs']} | {t['settings']} | "
                         f"{t['mem_after']:.1f} | {100 * t['d_mem']:+.0f}% | {t['util_after']:.2f} | "
                         f"{100 * t['d_util']:+.2f}% | {t['score']:.3f} | {_secs(t['seconds'])} |")
        lines.append("")
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def label_groups(points: list[tuple[str, float, float]], xspan: float, yspan: float,
                 near: float = 0.05) -> list[tuple[float, float, list[str]]]:
    """Labelled points closer than ``near`` of both axis spans share one label, names stacked one per
    line, so clustered best runs (several methods at -100% memorized) stay readable."""
    groups: list[tuple[float, float, list[str]]] = []
    for name, x, y in sorted(points, key=lambda p: (p[2], p[1], p[0])):
        for gx, gy, names in groups:
            if abs(x - gx) <= near * (xspan or 1.0) and abs(y - gy) <= near * (yspan or 1.0):
                names.append(name)
                break
        else:
            groups.append((x, y, [name]))
    return groups


def _place_labels(fig, ax, groups) -> None:
    """Each label beside its point (right, else left), moved up with a leader line only when both
    sides overlap a label already placed or a labelled point."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    # the outlined points themselves are obstacles too (s=60: about 9 px across at 110 dpi)
    placed = [Bbox.from_bounds(px - 6, py - 6, 12, 12)
              for px, py in (ax.transData.transform((x, y)) for x, y, _ in groups)]

    def label(x, y, text, lift, side, line=False):
        arrow = dict(arrowstyle="-", lw=0.4, color="grey") if line else None
        return ax.annotate(text, (x, y), fontsize=7, xytext=(7 * side, 3 + lift), textcoords="offset points",
                           va="bottom", ha="left" if side > 0 else "right", arrowprops=arrow)

    def free(x, y, text, lift, side) -> bool:
        ann = label(x, y, text, lift, side)
        box = ann.get_window_extent(renderer)  # the text alone (a leader line is added after)
        ann.remove()
        return not any(box.overlaps(p) for p in placed)

    for x, y, names in groups:
        text = "\n".join(names)
        # the first free spot, nearest first; nowhere free: the first spot anyway
        lift, side = next(((lift, side) for lift in range(0, 400, 7) for side in (1, -1)
                           if free(x, y, text, lift, side)), (0, 1))
        placed.append(label(x, y, text, lift, side, line=lift > 0).get_window_extent(renderer))


def scatter_png(rows: list[dict], best: dict) -> bytes:
    """Relative change in memorization (y) vs relative change in utility (x), every run faint, the best
    run per method labelled; one panel per setting."""
    plt = pyplot()

    settings = list(dict.fromkeys(_setting(r) for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab20")
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    for ax, setting in zip(axes[0], settings, strict=True):
        rs = [r for r in rows if _setting(r) == setting]
        for r in rs:
            ax.scatter(100 * r["d_util"], 100 * r["d_mem"], s=12, alpha=0.25, color=color[r["method"]])
        points = []
        for (s, m), r in best.items():
            if s != setting:
                continue
            ax.scatter(100 * r["d_util"], 100 * r["d_mem"], s=60, color=color[m], edgecolor="black",
                       label=m, zorder=3)
            points.append((m, 100 * r["d_util"], 100 * r["d_mem"]))
        xs = [100 * r["d_util"] for r in rs]
        ys = [100 * r["d_mem"] for r in rs]
        _place_labels(fig, ax, label_groups(points, max(xs) - min(xs), max(ys) - min(ys)))
        util = "accuracy" if row_utility_key(rs[0]).startswith("acc") else "perplexity"
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"relative change in {util} (%)")
        ax.set_ylabel("relative change in % memorized (%)")
        ax.set_title(os.path.basename(setting.rstrip("/")) or setting, fontsize=9)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("memorization removed vs utility kept (best run per method outlined)")
    data = _png(fig)
    plt.close(fig)
    return data


def epochs_series(rows: list[dict], best: dict) -> dict[str, list[tuple[float, float]]]:
    """Per method: (epochs, % memorized after) along the epochs axis at the best run's other settings;
    fine-tuning methods contribute their per-epoch evaluation history."""
    series: dict[str, list[tuple[float, float]]] = {}
    for (setting, m), b in best.items():
        info = b.get("method_info") or {}
        if info.get("history"):
            key = b["mem_metric"]
            pts = [(float(h.get("epoch", i + 1)), h[key]) for i, h in enumerate(info["history"]) if key in h]
            series[f"{m}"] = [(0.0, b["mem_before"]), *pts]
            continue
        hp = b.get("grid_point") or {}
        if "epochs" not in hp:
            continue
        others = {k: v for k, v in hp.items() if k != "epochs"}
        pts = [(0.0, b["mem_before"])]
        for r in rows:
            gp = r.get("grid_point") or {}
            if _setting(r) == setting and r["method"] == m and r["seed"] == b["seed"] and "epochs" in gp \
                    and {k: v for k, v in gp.items() if k != "epochs"} == others:
                pts.append((float(gp["epochs"]), r["mem_after"]))
        if len(pts) > 2:
            series[m] = sorted(set(pts))
    return series


def epochs_png(series: dict) -> bytes | None:
    if not series:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, pts in sorted(series.items()):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("unlearning / fine-tuning epochs")
    ax.set_ylabel("% memorized")
    ax.set_title("memorization over epochs (best run's other settings)")
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def _html(records: list[dict], images: dict[str, bytes], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin-bottom:2em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
             "th{background:#eee}img{max-width:100%;border:1px solid #ddd}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for setting in dict.fromkeys(t["setting"] for t in records):
        recs = [t for t in records if t["setting"] == setting]
        un = recs[0]["util_name"]
        parts.append(f"<h2>{html.escape(setting)}</h2><p>base: {recs[0]['mem_before']:.1f}% memorized, "
                     f"{html.escape(un)} {recs[0]['util_before']:.2f}</p><table><tr>")
        heads = ["method", "category", "runs", "best settings", "mem %", "Δmem", un, f"Δ{un.split()[0]}",
                 "score", "seconds"]
        parts.append("".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>")
        for t in recs:
            cells = [t["method"], t["category"], t["runs"], t["settings"], f"{t['mem_after']:.1f}",
                     f"{100 * t['d_mem']:+.0f}%", f"{t['util_after']:.2f}", f"{100 * t['d_util']:+.2f}%",
                     f"{t['score']:.3f}", _secs(t["seconds"])]
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for name, data in images.items():
        b64 = base64.b64encode(data).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img class='plot' alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{b64}'>")
    # lets a headless browser (and the test) confirm that every plot decoded and has a size
    parts.append("<script>window.addEventListener('load',function(){var im=document.querySelectorAll("
                 "'img.plot'),ok=0;im.forEach(function(i){if(i.complete&&i.naturalWidth>0)ok++;});"
                 "document.body.setAttribute('data-plots-loaded',ok+'/'+im.length);});</script>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(rows: list[dict], out_dir: str, *, title: str = "tinymem_fast report",
                 perp_cutoff: float = 500.0, mem_cutoff: float = 100.0, utility_metric: str | None = None,
                 mem_metric: str | None = None) -> dict[str, str]:
    """Write report.md, scatter.png, epochs.png (when there are epoch series), report.html and
    best_runs.json into ``out_dir``; returns their paths. ``utility_metric`` / ``mem_metric`` re-score
    every row (see :func:`best_runs`)."""
    if not rows:
        raise ValueError("no result rows to report")
    from ..tinymem.results import rescore

    rows = [rescore(r, utility_metric, mem_metric) for r in rows]
    os.makedirs(out_dir, exist_ok=True)
    best = best_runs(rows, perp_cutoff, mem_cutoff)
    if not best:
        raise ValueError(f"no run passes the cutoffs (perplexity < {perp_cutoff}, memorized < {mem_cutoff}%)")
    records = table(rows, best)
    images = {"relative change in memorization vs utility": scatter_png(rows, best)}
    ep = epochs_png(epochs_series(rows, best))
    if ep:
        images["memorization over epochs"] = ep
    paths = {}
    for name, data in zip(("scatter.png", "epochs.png"), images.values(), strict=False):
        paths[name] = os.path.join(out_dir, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    md = [f"# {title}", "", markdown_table(records), "![scatter](scatter.png)", ""]
    if ep:
        md += ["![epochs](epochs.png)", ""]
    paths["report.md"] = os.path.join(out_dir, "report.md")
    with open(paths["report.md"], "w") as f:
        f.write("\n".join(md))
    paths["report.html"] = os.path.join(out_dir, "report.html")
    with open(paths["report.html"], "w") as f:
        f.write(_html(records, images, title))
    paths["best_runs.json"] = os.path.join(out_dir, "best_runs.json")
    with open(paths["best_runs.json"], "w") as f:
        json.dump(records, f, indent=1, default=float)
    return paths
