"""Evaluation results as a markdown table and a PNG plot (docs/results/)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [f"# {meta.get('title', 'DSLA conversion quality')}", "",
             " ".join(f"{k}: {v}." for k, v in meta.items() if k != "title"), "",
             "| conversion | DSLA layers | ppl | teacher ppl | ppl ratio | top-1 agreement | KL | passkey |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        pk = r.get("passkey_accuracy")
        pk = "-" if pk is None else f"{pk:.2f} ({', '.join(f'{k}: {v:.2f}' for k, v in r['passkey_by_context'].items())})"
        lines.append(f"| {r['conversion']:.2f} | {len(r['dsla_layers'])} | {r['ppl']:.3f} | {r['teacher_ppl']:.3f} | "
                     f"{r['ppl_ratio']:.4f} | {r['top1_agreement']:.4f} | {r['kl']:.4f} | {pk} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r["conversion"] for r in results]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r["ppl_ratio"] for r in results], "o-", label="ppl ratio")
    ax.plot(xs, [r["top1_agreement"] for r in results], "s--", label="top-1 agreement")
    if all("passkey_accuracy" in r for r in results):
        ax.plot(xs, [r["passkey_accuracy"] for r in results], "^:", label="passkey accuracy")
    ax.set_xlabel("conversion ratio (layers as DSLA)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the format is named: the caller writes a temporary name
    plt.close(fig)
    return True


def _write_whole(path: Path, write) -> bool:
    """write(tmp), then tmp renamed over path unless write returned False: a failure leaves the old
    file whole."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if write(tmp) is False:
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_report(results: list[dict], meta: dict, out_dir, name: str = "eval") -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for path, text in ((out / f"{name}.md", markdown_table(results, meta)),
                       (out / f"{name}.json", json.dumps({"meta": meta, "results": results}, indent=1))):
        _write_whole(path, lambda p, t=text: p.write_text(t))
        paths.append(str(path))
    png = out / f"{name}.png"
    if _write_whole(png, lambda p: plot(results, p, f"{meta.get('model', '')}: {name}")):  # False: no matplotlib
        paths.append(str(png))
    return paths
