"""`minivit plot WORKDIR`: training loss, learning rate and test accuracy curves as one PNG.

Reads the records the trainer appends to `WORKDIR/metrics.jsonl` (train records carry
`train_loss` and `lr`, evaluation records carry `accuracy`). Draws with matplotlib when it is
installed, otherwise with Pillow alone (the `images` extra), so the picture needs no plotting stack.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (  # (record field, panel title)
    ("train_loss", "training loss"),
    ("lr", "learning rate"),
    ("accuracy", "test accuracy"),
)
PANEL_W, PANEL_H, MARGIN = 360, 260, 48  # pixels of one Pillow panel and its axis margin


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """The curves in a metrics.jsonl file: field -> (steps, values), in file order.

    Shapes: each curve is two lists of equal length.
    """
    curves: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name, _ in PANELS}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error.msg})") from None
        kind = "eval" if "accuracy" in record else "train"
        for name, _ in PANELS:
            if name in record and (name != "lr" or kind == "train"):
                curves[name][0].append(int(record["step"]))
                curves[name][1].append(float(record[name]))
    if not curves["lr"][0]:  # no train records: fall back to the lr logged with evaluations
        curves["lr"] = _eval_lr(path)
    return curves


def _eval_lr(path: str | Path) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if "lr" in record:
            steps.append(int(record["step"]))
            values.append(float(record["lr"]))
    return steps, values


def plot_metrics(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Draw WORKDIR/metrics.jsonl into a PNG (default WORKDIR/metrics.png) and return its path."""
    workdir = Path(workdir)
    metrics = workdir / "metrics.jsonl" if workdir.is_dir() else workdir
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} does not exist; give the --workdir of a `minivit finetune` run"
        )
    curves = read_metrics(metrics)
    if not any(steps for steps, _ in curves.values()):
        raise ValueError(f"{metrics} holds no train or evaluation records yet")
    out = Path(out) if out else metrics.with_name("metrics.png")
    try:
        import matplotlib  # noqa: PLC0415  (optional)
    except ImportError:
        _plot_pillow(curves, out, title=str(workdir))
    else:
        matplotlib.use("Agg")
        _plot_matplotlib(curves, out, title=str(workdir))
    return out


def _plot_matplotlib(curves: dict, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (name, label) in zip(axes, PANELS):
        steps, values = curves[name]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_pillow(curves: dict, out: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415  (the `images` extra)

    image = Image.new("RGB", (PANEL_W * len(PANELS), PANEL_H + 24), "white")
    draw = ImageDraw.Draw(image)
    try:
        draw.font = ImageFont.load_default(size=13)  # Pillow >= 10.1: a scalable font
    except TypeError:
        draw.font = ImageFont.load_default()
    draw.text((8, 4), title, fill="black")
    for index, (name, label) in enumerate(PANELS):
        box = (index * PANEL_W, 24, (index + 1) * PANEL_W, PANEL_H + 24)
        _panel(draw, box, *curves[name], label)
    image.save(out, format="PNG")


def _panel(draw, box: tuple[int, int, int, int], steps: list, values: list, label: str) -> None:
    """One line chart inside `box` (left, top, right, bottom): axes, min/max labels, the curve."""
    left, top = box[0] + MARGIN, box[1] + 22
    right, bottom = box[2] - 12, box[3] - 28
    draw.text((box[0] + MARGIN, box[1] + 4), label, fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    if not steps:
        draw.text((left + 10, (top + bottom) // 2), "no records", fill="gray")
        return
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1.0), y1 + 0.5 * (abs(y1) or 1.0)
    x1 = x1 if x1 > x0 else x0 + 1

    def at(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (right - left)
        return x, bottom - (value - y0) / (y1 - y0) * (bottom - top)

    points = [at(s, v) for s, v in zip(steps, values)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points if len(points) < 30 else points[-1:]:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
    draw.text((box[0] + 2, top - 6), f"{y1:.3g}", fill="black")
    draw.text((box[0] + 2, bottom - 6), f"{y0:.3g}", fill="black")
    draw.text((left, bottom + 4), f"{x0}", fill="black")
    draw.text((right - 30, bottom + 4), f"{x1}", fill="black")
    draw.text(((left + right) // 2 - 10, bottom + 14), "step", fill="gray")
