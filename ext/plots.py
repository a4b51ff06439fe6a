"""evaluate.py report (run through its second lazy seam): the eta table of run folders from their metrics.json and
the other measures' results beside it, the reproducibility study's table, and the figures, drawn with
pillow (no plotting library); gmm.py draws with plot too.

  report.md            the eta table (a row per samples file scored) and the reproducibility study's
  report.png           FID, IS, precision, recall (and an adapter's edge F1 and accuracy) against eta
  report-guidance.png  a guidance sweep: FID against IS and precision against recall, a curve per eta (Fig. 3)
  report-rmd.png       the RMD density per eta (Fig. 4), report-entropy.png the VQ sample entropy against guidance
  report-study.png     the reproducibility study (Zhang et al.): reproducibility and generalization against size
"""
import argparse
import glob
import os
import re
import sys

import numpy as np
from PIL import Image, ImageDraw

from ext.study import study_rows
from plumbing import read_file, save_atomic


def collect(run_dirs):
    """The eta rows of the run folders: one per samples file scored (metrics*.json, and the results of the other
    measures beside it: diversity, control, classify), e.g. one per guidance scale."""
    rows = []
    for d in run_dirs:
        run = os.path.basename(os.path.normpath(d))
        # one row per samples file scored: metrics-X.json, diversity-X.json ... (X: a sweep's -cfg2, or none)
        kinds = ("metrics", "diversity", "control", "classify")
        for x in sorted({re.sub(r"^(metrics|diversity|control|classify)", "", os.path.basename(p)) for k in kinds
                         for p in glob.glob(os.path.join(d, f"{k}*.json"))}):
            m, div, ctl, acc = (read_file(p, "score its samples again with evaluate.py") if os.path.isfile(p) else {}
                                for p in (os.path.join(d, k + x) for k in kinds))
            if not (m or div or ctl):
                continue
            settings = m.get("settings") or div.get("settings") or ctl.get("settings") or {}
            config = settings.get("config") or read_file(os.path.join(d, "config.json"), "train.py writes it: a run "
                                                                                          "folder without one is no run")
            # an adapter's row: the corruption its frozen base was pre-trained with (Chen et al. Table 2)
            t = dict(config["train"], **config.get("base", {}))
            rows.append(dict(run=run, cond=t.get("cond", "class"), eta=t["eta"], corruption=t["corruption"],
                             mode=t["corruption_mode"], cep=t["cep"], ip=t.get("ip_gamma") or 0.0,
                             gamma=t["cep_gamma"] if t["cep"] != "none" else None, cfg=settings.get("cfg_scale"),
                             n=m.get("num_samples", div.get("num_samples", ctl.get("num_samples"))),
                             adapter=config["train"].get("adapter"), edge_f1=ctl.get("edge_f1"),
                             accuracy=acc.get("accuracy"),
                             **{k: m.get(k) for k in ("fid", "sfid", "is_mean", "precision", "recall")},
                             **{k: div.get(k) for k in ("rmd_top1", "nn5_l2", "memorization_ratio", "toppr_f1",
                                                        "entropy", "rmd_density", "rmd_edges")}))
        if not any(glob.glob(os.path.join(d, f"{k}*.json")) for k in ("metrics", "diversity", "control", "memorization")):
            print(f"skipping {d}: no metrics.json or memorization.json", file=sys.stderr)
    return sorted(rows, key=lambda r: (r["adapter"] or "", r["cond"], r["cep"], r["gamma"] or 0, r["ip"],
                                       r["corruption"], r["mode"], r["eta"] if r["eta"] is not None else -1))


def markdown(columns, rows):
    """A markdown table: columns is [(title, row -> cell text)]."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]) + "\n"


num = lambda key, spec: lambda r: "-" if r[key] is None else f"{r[key]:{spec}}"
ETA_COLUMNS = [("run", lambda r: r["run"]), ("cond", lambda r: r["cond"]), ("adapter", lambda r: r["adapter"] or "-"),
               ("eta (%)", lambda r: "-" if r["eta"] is None else f"{r['eta'] * 100:g}"),
               ("corruption", lambda r: f"{r['corruption']}/{r['mode']}"),
               ("CEP", lambda r: r["cep"] if r["cep"] == "none" else f"{r['cep']} (gamma {r['gamma']:g})"),
               ("IP gamma", lambda r: f"{r['ip']:g}" if r["ip"] else "-"),
               ("cfg", num("cfg", "g")), ("samples", lambda r: str(r["n"])), ("FID", num("fid", ".2f")),
               ("sFID", num("sfid", ".2f")), ("IS", num("is_mean", ".2f")), ("precision", num("precision", ".3f")),
               ("recall", num("recall", ".3f")), ("top-1% RMD", num("rmd_top1", ".3f")),
               ("NN L2", num("nn5_l2", ".3f")), ("mem. ratio", num("memorization_ratio", ".3f")),
               ("TopPR F1", num("toppr_f1", ".3f")), ("entropy", num("entropy", ".3f")),
               ("edge F1", num("edge_f1", ".3f")), ("accuracy", num("accuracy", ".3f"))]
STUDY_COLUMNS = [("run", lambda r: r["run"]), ("training images", lambda r: str(r["images"])),
                 ("width", lambda r: str(r["width"])), ("seed", lambda r: str(r["seed"])),
                 ("reproducibility", num("rp", ".3f")), ("generalization", num("gl", ".3f")),
                 ("features", lambda r: r["features"])]


def cmd_report(a):
    """evaluate.py report: OUT.md, the eta table of the run folders (one row per samples file scored) and the
    reproducibility study's; OUT.png and the other figures."""
    dirs = [d for pattern in a.runs for d in (sorted(glob.glob(pattern)) or [pattern]) if os.path.isdir(d)]
    if not dirs:
        raise ValueError(f"no folder among {' '.join(a.runs)}: give run folders (a shell pattern such as 'runs/*' too)")
    rows, study = collect(dirs), study_rows(dirs)
    a.out = a.out or os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in dirs]), "report")
    eta_rows = [dict(r, eta_pct=r["eta"] * 100) for r in rows if r["eta"] is not None]
    wrote = report_figures(eta_rows if rows else None, study, a.out)
    if not rows and not study:
        raise ValueError("no run folder with a metrics.json (or memorization.json): run sample.py and evaluate.py "
                         "first")
    table = "\n".join(t for t in (markdown(ETA_COLUMNS, rows) if rows else "",
                                  markdown(STUDY_COLUMNS, study) if study else "") if t)
    save_atomic(a.out + ".md", lambda f: f.write(table.encode()))
    print(table + f"wrote {a.out}.md, {' and '.join(wrote)}")
    return eta_rows + study


# ----------------------------------------------------------------------------- figures

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def plot(rows, path, x, xlabel, panels, series_of, order=None, w=420, h=300):
    """One panel per (key, title, y label[, x key, x label]) of `panels` against row[x], a line per series_of(row)
    through the mean of its points at each x, or (order) through its points in the order of row[order]: the FID-IS
    curve of a guidance sweep. Drawn with pillow."""
    series = {}
    for r in rows:
        series.setdefault(series_of(r), []).append(r)
    nrow = -(-len(panels) // 2)
    img = Image.new("RGB", (2 * w, nrow * h + 24 * (len(series) // 2 + 1)), "white")
    d = ImageDraw.Draw(img)
    for p, (key, title, ylabel, *px) in enumerate(panels):
        ox, oy, (px, pxlabel) = (p % 2) * w, (p // 2) * h, px or (x, xlabel)
        left, top, right, bottom = ox + 55, oy + 42, ox + w - 15, oy + h - 35
        pts = [(r[px], r[key]) for r in rows if r[key] is not None and r[px] is not None]
        d.text((ox + w // 2 - 3 * len(title), oy + 4), title, fill="black")
        d.text((ox + 4, oy + 22), ylabel, fill="black")
        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left + (right - left) // 2 - 3 * len(pxlabel), bottom + 20), pxlabel, fill="black")
        if not pts:
            d.text((left + (right - left) // 2 - 21, (top + bottom) // 2 - 6), "no data", fill="black")
            continue
        (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*pts)]
        xpad, pad = (x1 - x0) * 0.06 or 1.0, (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1.0  # no point on the frame
        xs, (x0, x1), (y0, y1) = [v for v, _ in pts], (x0 - xpad, x1 + xpad), (y0 - pad, y1 + pad)
        X = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
        Y = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)
        whole = all(float(v).is_integer() for v in xs)  # e.g. log2 of subset sizes: a tick at each integer
        xticks = sorted(set(int(v) for v in xs)) if whole else [min(xs) + (max(xs) - min(xs)) * i / 4 for i in range(5)]
        for i in range(5):
            yv = y0 + (y1 - y0) * i / 4
            d.line([left - 4, Y(yv), left, Y(yv)], fill="black")
            d.text((ox + 4, Y(yv) - 6), f"{yv:.3g}", fill="black")
        for xv in xticks:
            d.line([X(xv), bottom, X(xv), bottom + 4], fill="black")
            d.text((X(xv) - 8, bottom + 6), f"{xv:.3g}", fill="black")
        for s, (name, rs) in enumerate(series.items()):
            c = COLOURS[s % len(COLOURS)]
            at = {v: [r[key] for r in rs if r[px] == v and r[key] is not None] for v in sorted({r[px] for r in rs})
                  if v is not None}
            xy = [(X(v), Y(float(np.mean(ys)))) for v, ys in at.items() if ys] if order is None else \
                [(X(r[px]), Y(r[key])) for r in sorted(rs, key=lambda r: r[order]) if None not in (r[px], r[key])]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2)
            for u, v in xy:
                (d.ellipse if s % 2 == 0 else d.rectangle)([u - 4, v - 4, u + 4, v + 4], fill=c)
    for s, name in enumerate(series):
        u, v = 20 + (s % 2) * w, nrow * h + 6 + (s // 2) * 24
        c = COLOURS[s % len(COLOURS)]
        (d.ellipse if s % 2 == 0 else d.rectangle)([u, v, u + 8, v + 8], fill=c)
        d.text((u + 14, v - 2), name, fill="black")
    save_atomic(path, lambda f: img.save(f, "PNG"))


def diversity_plots(rows, out, series_of):
    """Chen et al. Fig. 4 from the diversity.json beside the metrics: the RMD density per eta (OUT-rmd.png) and the
    sample entropy against guidance (OUT-entropy.png). -> the files written."""
    dens = [dict(r, rmd=(lo + hi) / 2, density=v) for r in rows if r["rmd_density"]
            for lo, hi, v in zip(r["rmd_edges"], r["rmd_edges"][1:], r["rmd_density"])]
    wrote = []
    if dens:
        plot(dens, out + "-rmd.png", "rmd", "relative Mahalanobis distance", [("density", "RMD density", "density")],
             lambda r: series_of(r) + f", cfg {r['cfg']}", order="rmd")
        wrote.append(out + "-rmd.png")
    if any(r["entropy"] is not None for r in rows):
        plot(rows, out + "-entropy.png", "cfg", "guidance scale", [("entropy", "sample entropy", "nats")], series_of)
        wrote.append(out + "-entropy.png")
    return wrote


def report_figures(rows, study, out):
    """The figures of `evaluate.py report` as OUT.png, OUT-*.png: rows, the eta rows with eta_pct (None: no eta
    table); study, the study's rows. -> the files written."""
    wrote = []
    if rows is not None:
        cep = lambda r: ("no CEP" if r["cep"] == "none" else f"CEP-{r['cep'][0].upper()} gamma {r['gamma']:g}") + \
            (f", IP {r['ip']:g}" if r["ip"] else "")
        sweep = len({r["cfg"] for r in rows}) > 1
        extra = [(k, title, title) for k, title in (("edge_f1", "edge F1"), ("accuracy", "conditioning accuracy"))
                 if any(r[k] is not None for r in rows)]  # an adapter's control fidelity (Fig. 6 with Table 2)
        plot(rows, out + ".png", "eta_pct", "eta (%)", [("fid", "FID", "FID"), ("is_mean", "IS", "IS"),
             ("precision", "precision", "precision"), ("recall", "recall", "recall")] + extra,
             lambda r: f"{r['adapter'] + ', ' if r['adapter'] else ''}{r['cond']}, {cep(r)}, {r['corruption']}/"
                       f"{r['mode']}" + (f", cfg {r['cfg']}" if sweep else ""))
        wrote.append(out + ".png")
        wrote += diversity_plots(rows, out, lambda r: f"eta {r['eta_pct']:g}%, {cep(r)}")
        if sweep:  # Chen et al. Fig. 3: a curve per eta through its guidance scales
            plot(rows, out + "-guidance.png", None, None, [("fid", "FID against IS", "FID", "is_mean", "IS"),
                 ("precision", "precision against recall", "precision", "recall", "recall")],
                 lambda r: f"eta {r['eta_pct']:g}%, {r['cond']}, {cep(r)}", order="cfg")
            wrote.append(out + "-guidance.png")
    if study:
        plot(study, out + "-study.png", "log2n", "log2 training images",
             [("rp", "reproducibility (between seeds)", "pairs with cosine > threshold"),
              ("gl", "generalization", "1 - memorized fraction")], lambda r: f"width {r['width']}")
        wrote.append(out + "-study.png")
    return wrote


EVALUATE = dict(report=cmd_report)  # evaluate.py's command


def parser(command):
    p = argparse.ArgumentParser(prog=f"evaluate.py {command}", description=EVALUATE[command].__doc__)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.json (or the other results)")
    p.add_argument("--out", help="writes OUT.md and OUT.png (default: report.md and report.png in the run "
                                 "folders' parent, e.g. runs/)")
    return p
