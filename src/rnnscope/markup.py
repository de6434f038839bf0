"""The one place where text becomes HTML: every string shown in report.html or a notebook
passes through `text`, so a name holding markup ("<script>") is shown, never run."""

from __future__ import annotations

import base64
import html
import io


def text(v) -> str:
    """Any value as escaped HTML text (quotes too: safe inside attributes)."""
    return html.escape(str(v), quote=True)


def html_table(title: str, rows: dict) -> str:
    """A two-column table of name -> value under a bold title (a result's `_repr_html_`)."""
    body = "".join(f"<tr><td>{text(k)}</td><td>{text(v)}</td></tr>" for k, v in rows.items())
    return f"<b>{text(title)}</b><table>{body}</table>"


def inline_figure(plot) -> str:
    """`plot()`'s figure as an inline PNG <img>, or "" when matplotlib is not installed or the
    result cannot be drawn (a notebook repr must never fail)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return ""
    import matplotlib.pyplot as plt

    try:
        fig = plot()
    except Exception:  # noqa: BLE001 - a repr shows the table even if a figure is impossible
        return ""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='figure' src='data:image/png;base64,{data}'>"
