"""Loaded at start-up by the conventions test's --quick run (tests/repo_checks.py, `quick_run`).

It wraps matplotlib's `Figure.savefig` as soon as matplotlib is imported and writes, for every
figure the run saves, its pixel size and each axes' labels and texts to the JSON-lines file named
in $FIG_REPORT. `check_figures` reads that file. Nothing here changes what the run computes.
"""

import builtins
import json
import os
import sys

_REPORT = os.environ.get("FIG_REPORT")
_import = builtins.__import__


def _describe(fig, path, dpi):
    axes = []
    for ax in fig.get_axes():
        texts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        texts += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
        axes.append({"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                     "title": ax.get_title(), "axis_on": bool(ax.axison),
                     "has_data": bool(ax.lines or ax.collections or ax.patches or ax.images),
                     "only_image": bool(ax.images) and not (ax.lines or ax.collections),
                     "xticks_text": [t.get_text() for t in ax.get_xticklabels()],
                     "texts": [t for t in texts if t]})
    fig_texts = [t.get_text() for t in fig.texts]
    if getattr(fig, "_suptitle", None) is not None:
        fig_texts.append(fig._suptitle.get_text())
    for leg in fig.legends:
        fig_texts += [t.get_text() for t in leg.get_texts()]
    w, h = fig.get_size_inches()
    dpi = dpi if isinstance(dpi, (int, float)) else fig.dpi
    return {"path": str(path), "dpi": float(dpi), "width_px": int(round(w * dpi)),
            "height_px": int(round(h * dpi)), "axes": axes, "fig_texts": fig_texts}


def _patch():
    figure = sys.modules["matplotlib.figure"]
    original = figure.Figure.savefig
    if getattr(original, "_figprobe", False):  # a nested import got here first
        return

    def savefig(self, fname, *args, **kwargs):
        result = original(self, fname, *args, **kwargs)
        try:
            record = _describe(self, fname, kwargs.get("dpi", "figure"))
            with open(_REPORT, "a") as f:
                f.write(json.dumps(record) + "\n")
        except Exception as e:  # the probe must never break a run
            sys.stderr.write(f"figprobe: {e}\n")
        return result

    savefig._figprobe = True
    figure.Figure.savefig = savefig


def _hook(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    figure = sys.modules.get("matplotlib.figure")
    if figure is not None and hasattr(figure, "Figure"):  # fully imported, not half-way
        builtins.__import__ = _import
        _patch()
    return module


if _REPORT:
    builtins.__import__ = _hook
