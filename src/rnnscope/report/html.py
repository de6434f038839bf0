"""report.html: one self-contained page (figures embedded as PNG data URIs, no network), with
plain-language readings generated from the numbers of a `StudyResult` or `ExperimentResult`.

Every value taken from the results reaches the page through `markup.text` (via `_e` and
`_num`), which escapes it: a results.json holding markup (a module named "<script>") is shown
as text, never run.
"""

from __future__ import annotations

import math

from ..markup import text as _e
from ..results import SUMMARY_HEADERS, format_number
from ..study_results import EXPERIMENT_HEADERS


def _num(v) -> str:
    """A number (int, float or None) as escaped HTML text."""
    return _e(format_number(v))


def _table(rows: list[dict], headers: dict) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers.values())
    body = "".join("<tr>" + "".join(
        f"<td>{_e(r[k]) if k == 'model' else _num(r[k])}</td>"
        for k in headers) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _paragraphs(out: list[str]) -> str:
    return "<p>" + "</p><p>".join(out) + "</p>" if out else ""


# ---- readings --------------------------------------------------------------------------------


def reading_gradient_flow(results) -> str:
    out = []
    T = results.seq_len
    k = min(10, T - 1)
    rows = {}
    for name, p in results.comparison.profiles.items():
        nd = p.by_distance()
        frac = float(nd[k] / nd[0]) if nd[0] > 0 else math.nan
        r = rows[name] = p.summary()
        em, rate = r["effective_memory"], r["decay_rate"]
        s = (f"<b>{_e(name)}</b>: the gradient reaching {k} steps before the output is "
             f"{_num(frac)} of the gradient at the output step; fitted over all {T} steps it "
             f"halves every {_num(r['half_life'])} steps (decay rate {_num(rate)} "
             f"per step), and {_num(em)} of {T} timesteps receive more "
             f"than 1% of the largest gradient.")
        if em is not None and em <= 2 and rate < 0.01:
            s += (" Its profile is nearly flat beyond the output step: one very large gradient "
                  "at the output step itself (a residual path) sets the 1% bar, so the "
                  "effective memory looks short although distant steps keep a steady share.")
        s += _underflow_note(p)
        out.append(s)
    if results.command == "compare" and len(rows) > 1:
        fastest = max(rows, key=lambda n: rows[n]["decay_rate"])
        out.append(f"Steepest decay: <b>{_e(fastest)}</b>. The additive "
                   "cell-state update gives LSTM and GRU a path whose decay is set by the "
                   "gates; a vanilla RNN multiplies by diag(tanh′)·W_hh at every step; "
                   "attention connects every step to the output directly.")
    return _paragraphs(out)


def _underflow_note(profile) -> str:
    """A sentence when a profile falls below its dtype's smallest normal number
    (`GradientProfile.underflow`; the figure's log panel draws the same line)."""
    u = profile.underflow()
    if u is None:
        return ""
    dtype, tiny, first, zero = u
    s = (f" From {first} steps before the output on, the mean gradient is below "
         f"{_e(dtype)}'s smallest normal number ({_num(tiny)}): autograd's gradients keep "
         "only a few digits there")
    if zero is not None:
        s += f" and read exactly 0 from {zero} steps on"
    return s + (" — this is the gradient training receives in this dtype, not a measurement "
                "error; the Jacobian figures below are computed beyond it.")


def reading_lag(results) -> str:
    out = []
    for name, lp in results.lag_profiles().items():
        bl = lp.by_lag()
        k = min(10, len(bl) - 1)
        frac = float(bl[k] / bl[0]) if len(bl) and bl[0] > 0 else math.nan
        out.append(f"<b>{_e(name)}</b>, measured at <code>{_e(lp.site)}"
                   f"</code> over {len(lp.positions)} loss steps: the loss at step t reaches the "
                   f"input {k} steps earlier with {_num(frac)} of the gradient it sends to its "
                   f"own step; it halves every {_num(lp.half_life())} steps, and "
                   f"{_num(lp.effective_memory())} lags carry more than 1% of the largest. "
                   "This is the memory a per-step loss actually uses; the profile above sums all "
                   "steps' losses and hides it.")
    return _paragraphs(out)


def reading_highway(results) -> str:
    out = []
    for name, rec in results.analysed().items():
        cj = rec.layers[0].cell_jacobians
        curves = cj.by_distance()  # by distance from each sample's own last step
        steps = cj.spectral.shape[1]
        k = min(10, steps - 1)
        n = rec.jacobian_samples
        on = "1 sample" if n == 1 else f"the mean over {n} samples"
        s = (f"<b>{_e(name)}</b> (layer 0, Jacobians of {on}): "
             f"‖∂s<sub>T−1</sub>/∂s<sub>t</sub>‖₂ at "
             f"distance {k} is {_num(float(curves['spectral'][k]))}")
        if "direct_spectral" in curves:
            share1 = float(curves["share"][1]) if steps > 1 else 1.0
            gate = {"lstm": "forget gates f", "gru": "retain gates z"}.get(rec.kind,
                                                                       "decays a")
            s += (f"; the highway alone (the product of the {gate}, largest unit) is "
                  f"{_num(float(curves['direct_spectral'][k]))}. The direct path carries "
                  f"{_num(100 * share1)}% of the Jacobian's energy over one step and "
                  f"{_num(100 * float(curves['share'][k]))}% over {k} steps; "
                  "the rest flows through h and the next step's gates (the indirect paths).")
            if rec.linear_in_state:
                s += " This recurrence is linear in its state: the highway is the whole Jacobian."
        else:
            s += "; a vanilla RNN has no highway: every path goes through W_hh and tanh′."
        out.append(s)
    return _paragraphs(out)


def reading_step_paths(results) -> str:
    out = []
    for name, rec in results.analysed().items():
        sp = rec.layers[0].step_paths
        if rec.kind != "lstm" or sp.direct_mean is None:
            continue
        md, mi = float(sp.direct_mean.mean()), float(sp.indirect_spectral.mean())
        out.append(f"<b>{_e(name)}</b>: per step the direct term diag(f<sub>t</sub>) "
                   "averages "
                   f"{_num(md)} and the indirect term ‖∂c<sub>t</sub>/∂c<sub>t−1</sub> − "
                   f"diag(f<sub>t</sub>)‖₂ averages "
                   f"{_num(mi)}: the classic LSTM gradient-flow analysis's “f_t is the dominant "
                   f"term” holds "
                   f"{'here' if md > mi else 'not here — the indirect paths are larger'}.")
    return _paragraphs(out)


def reading_gates(results) -> str:
    out = []
    T = results.seq_len
    for name, rec in results.analysed().items():
        if rec.gates is None:
            continue
        for s in rec.gates.layers:
            mt = sorted(s.memory_time.tolist())
            med = mt[len(mt) // 2]
            gate = {"f": "forget gate f", "z": "retain gate z"}.get(s.gate, "decay |a|")
            txt = (f"<b>{_e(name)}</b> layer {_num(s.layer)}"
                   f"{' dir 1' if s.direction else ''}: mean {gate} {_num(s.mean)}, median "
                   f"memory time 1/(1−f̄) {_num(med)} steps for a sequence of {T}; "
                   f"{_num(100 * s.saturation['>0.99'])}% of gate values exceed 0.99 "
                   f"and {_num(100 * s.saturation['<0.1'])}% are below 0.1.")
            if med < T / 10 and s.gate in ("f", "z"):  # the bias fixes are LSTM/GRU's
                if results.command == "compare":
                    fix_one, fix_chrono = "--forget-bias 1.0", "--forget-bias chrono"
                else:  # inspect analyses the user's model: the fix is in their code
                    fix_one = "rnnscope.init_forget_bias(m, 1.0) on this module m"
                    fix_chrono = f"rnnscope.chrono_init(m, t_max={T})"
                txt += (" Memory times this short close the highway within a few steps; a "
                        f"forget bias of 1 (f ≈ 0.73 at zero input, {fix_one}) or chrono "
                        "initialisation (memory times spread up to the sequence length, "
                        f"{fix_chrono}) keeps it open longer.")
            out.append(txt)
    return _paragraphs(out)


def reading_decay(results) -> str:
    rows = results.decay_table.rows
    longest = max(r["length"] for r in rows)
    at = {r["forget"]: r["factor"] for r in rows if r["length"] == longest}
    parts = ", ".join(f"f = {_num(f)}: {_num(v)}" for f, v in sorted(at.items()))
    return (f"<p>With a constant forget gate the direct path scales the gradient by "
            f"f<sup>L</sup>. Over "
            f"{_num(longest)} steps: {parts}. Even f = 0.99 (memory time 100 steps) passes almost "
            "nothing over 1000 steps — why LSTMs still struggle past ~1000 steps.</p>")


# ---- page ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.5}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}.muted{color:#666;font-size:.9em}
.reading{background:#f7f9fc;border-left:4px solid #4a7bd0;padding:.4em 1em}
"""

TITLES = {
    "gradient_flow": (
        "Gradient flow back through time",
        "Mean ‖∂L/∂x<sub>t</sub>‖ over samples vs distance from the output step "
        "(k = T−1−t, from each sequence's own last step), linear (left, ±1 std band) and log "
        "scale (right).", reading_gradient_flow),
    "lag": (
        "How far back each step's loss reaches",
        "Mean ‖∂ℓ<sub>t</sub>/∂x<sub>t−k</sub>‖ over samples and loss steps t, against the lag "
        "k (log scale): the per-step loss ℓ<sub>t</sub> differentiated alone.", reading_lag),
    "highway": (
        "The cell-state path: direct highway vs total",
        "Left: spectral norm of the exact span Jacobian ∂s<sub>T−1</sub>/∂s<sub>t</sub> "
        "(solid) and of the direct path alone, the product of forget (LSTM) or retain (GRU) "
        "gates (dashed: largest unit, dotted: mean unit). Right: the direct path's share of "
        "the Jacobian's energy, ‖D‖²/(‖D‖² + ‖J − D‖²).", reading_highway),
    "step_paths": (
        "One step of the LSTM cell-state path",
        "∂c<sub>t</sub>/∂c<sub>t−1</sub> = diag(f<sub>t</sub>) + indirect paths through "
        "h<sub>t−1</sub> and the gates, computed exactly at every step (at t = 0 the initial "
        "h<sub>0</sub> is an input, not a function of c<sub>0</sub>, so the indirect term is 0 "
        "there).", reading_step_paths),
    "gates": (
        "Forget and retain gates",
        "Left: distribution of gate values (LSTM f, GRU z, the decay |a| of a modern linear "
        "recurrence) over samples, steps and units; "
        "right: per-unit memory time 1/(1 − mean gate), cumulative.", reading_gates),
    "decay": (
        "Why long sequences remain hard",
        "f<sup>L</sup> for constant forget gates: the classic LSTM gradient-flow analysis's "
        "decay table as curves.",
        reading_decay),
}


def _head(title: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{title}</title><style>{CSS}</style></head><body><h1>{title}</h1>")


def _figure_sections(results, figures_b64: dict, titles: dict, extra=None) -> list[str]:
    parts = []
    for name, (head, caption, reading) in titles.items():
        if name not in figures_b64:
            continue
        parts.append(f"<h2>{head}</h2>")
        parts.append(f"<figure><img id='fig-{_e(name)}' alt='{_e(head)}' "
                     f"src='data:image/png;base64,{figures_b64[name]}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
        text = reading(results) if reading else ""
        if text:
            parts.append(f"<div class='reading'>{text}</div>")
        if extra and name in extra:
            parts.append(extra[name](results))
    return parts


def _config_table(results) -> str:
    rows = {**results.config, **results.versions, "wall time (s)": results.seconds}
    return ("<h2>Run configuration</h2><table><tbody>" + "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>"
        for k, v in rows.items()) + "</tbody></table>"
        "<p class='muted'>Every number behind these figures is in results.json next to this "
        "page; <code>rnnscope replot results.json</code> redraws them.</p>")


def render_html(results, figures_b64: dict) -> str:
    """The page of a `StudyResult` (compare or inspect)."""
    title = ("rnnscope: RNN vs LSTM vs GRU vs Transformer gradient flow"
             if results.command == "compare"
             else f"rnnscope: gradient flow in {_e(results.config.get('model', 'model'))}")
    parts = [_head(title),
             "<p class='muted'>How much gradient reaches each earlier timestep, how fast it "
             "decays, and whether the gates keep the cell-state highway open. All numbers are "
             "exact measurements on the models and inputs described at the bottom.</p>",
             "<h2>Summary</h2>",
             _table(results.comparison.table(), SUMMARY_HEADERS),
             "<p class='muted'>Decay ratio: mean norm at the first timestep over the last (≪ 1: "
             "early steps get little gradient). Decay rate r: least-squares fit of "
             "norm ≈ A·e^(−r·k) over distance k; half-life ln 2 / r. Effective memory: timesteps "
             "with more than 1% of the largest norm.</p>"]
    lyap = {n: r.layers[0].max_lyapunov for n, r in results.analysed().items()}
    if lyap:
        parts.append("<p class='muted'>Largest Lyapunov exponent of each recurrence (layer 0, "
                     "natural log per step; &lt; 0 contracts): " + ", ".join(
                         f"{_e(n)} {_num(v)}" for n, v in lyap.items()) + ".</p>")
    decay_rows = lambda r: _table(list(r.decay_table.rows), {  # noqa: E731
        "forget": "forget f", "length": "length L", "factor": "f^L",
        "memory_time": "memory time 1/(1−f)"})
    parts += _figure_sections(results, figures_b64, TITLES, extra={"decay": decay_rows})
    skipped = results.skipped()
    if skipped:
        parts.append("<h2>Not analysed</h2><ul>" + "".join(
            f"<li><code>{_e(n)}</code>: {_e(why)}</li>"
            for n, why in skipped.items()) + "</ul>")
    parts.append(_config_table(results))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- experiment page ---------------------------------------------------------------------------


def reading_learning(results) -> str:
    out = []
    for row in results.table():
        at = row["beats_half_baseline_at"]
        out.append(f"<b>{_e(row['model'])}</b>: final held-out loss "
                   f"{_num(row['final_over_baseline'])}× the memoryless baseline; "
                   + (f"first below 50% of the baseline at step {_num(at)}." if at is not None
                      else "never below 50% of the baseline in this run."))
    return "<p>" + "</p><p>".join(out) + "</p>"


def reading_profiles(results) -> str:
    out = []
    for row in results.table():
        out.append(f"<b>{_e(row['model'])}</b>: effective memory "
                   f"{_num(row['effective_memory_init'])} → {_num(row['effective_memory_end'])} "
                   f"steps (of {_num(results.config['sequence_length'])}).")
    return ("<p>Effective memory: timesteps whose gradient of the task loss exceeds 1% of the "
            "largest. " + " ".join(out) + "</p>")


EXPERIMENT_TITLES = {
    "learning_curves": ("Learning: loss against the memoryless baseline",
                        "Held-out loss divided by the task's exact memoryless baseline (copy: "
                        "10·log 8/(T+20); adding: 1/6) vs training step; below 1 the model uses "
                        "memory.", reading_learning),
    "profiles": ("Gradient flow at initialisation and after training",
                 "Mean ‖∂L/∂x<sub>t</sub>‖ of the task's own loss vs distance from the last "
                 "step (log scale), before and after training.", reading_profiles),
    "heatmaps": ("Gradient flow over training",
                 "Per training step (x) and lag before the last input (y): mean "
                 "‖∂L/∂x<sub>t</sub>‖ recorded by the GradientMonitor at every step, shared log "
                 "colour scale.", None),
    "memory_times": ("Gate memory times before and after",
                     "Per-unit memory time 1/(1 − mean forget/retain gate) on held-out inputs, "
                     "at initialisation (dashed) and after training (solid).", None),
}


def render_experiment_html(results, figures_b64: dict) -> str:
    """The page of an `ExperimentResult`."""
    cfg = results.config  # the fields read here are checked by ExperimentResult.from_dict
    title = f"rnnscope experiment: {_e(cfg['task'])} task, T = {_num(cfg['T'])}"
    parts = [_head(title),
             f"<p class='muted'>{len(results.variants)} variants trained with Adam "
             f"(lr {_num(cfg['lr'])}, gradient-norm clipping at {_num(cfg['clip'])}, batch "
             f"{_num(cfg['batch_size'])}, {_num(cfg['steps'])} steps, same seed and batches for "
             f"all); the "
             "GradientMonitor recorded gradient flow at every step.</p>",
             "<h2>Summary</h2>",
             _table(results.display_table(), EXPERIMENT_HEADERS)]
    parts += _figure_sections(results, figures_b64, EXPERIMENT_TITLES)
    parts.append(_config_table(results))
    parts.append("</body></html>")
    return "\n".join(parts)
