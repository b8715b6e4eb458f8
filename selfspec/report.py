"""Evaluation results for people: a markdown table and a self-contained HTML report.

Both read the metrics document that `selfspec.stages.evaluate.run_eval` writes:
the headline scoring first, then, under eval.scoring=both, the choice tasks scored by
log-likelihood (`by_scoring`) with the domain averages that scoring gives.
The HTML report embeds its figures as base64 PNG and its style inline, so it opens
offline and fetches nothing: per-task scores with 95% CIs, the data generation
funnel (`data/summary.json`) and the training loss curve (`train/metrics.jsonl`)
when the run has them, and a few predictions per task.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from selfspec.io import RunDir, exists, read_bytes, read_json

SAMPLES_PER_TASK = 4
COLORS = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


# -- formatting ----------------------------------------------------------------
def fmt_score(score: dict[str, Any]) -> str:
    text = f"{score['value']:.3f}"
    if score.get("ci_low") is not None:
        text += f" [{score['ci_low']:.3f}, {score['ci_high']:.3f}]"
    return text


def fmt_delta(delta: dict[str, Any]) -> str:
    text = f"{delta['value']:+.3f}"
    if delta.get("ci_low") is not None:
        text += f" [{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}]"
    return text


def delta_sign(delta: dict[str, Any]) -> str:
    """'up' or 'down' when the paired 95% CI excludes zero, else 'flat'."""
    if delta.get("ci_low") is None:
        return "flat"
    if delta["ci_low"] > 0:
        return "up"
    if delta["ci_high"] < 0:
        return "down"
    return "flat"


def _others(metrics: dict[str, Any]) -> list[str]:
    return [m for m in metrics["models"] if m != metrics["reference"]]


def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Header and rows of the per-task table; each cell is (text, css class)."""
    reference, others = metrics["reference"], _others(metrics)
    header = ["Task", "Domain", "Shots", "Metric", "n", reference]
    for model in others:
        header += [model, f"Δ {model}"]
    rows = []
    for task, info in metrics["tasks"].items():
        for shot in map(str, metrics["shots"]):
            for metric in info["metrics"]:
                ref = metrics["results"][reference][task][shot]
                row = [(task, ""), (info["domain"], ""), (shot, ""), (metric, ""), (str(ref["n"]), "")]
                row.append((fmt_score(ref[metric]), ""))
                for model in others:
                    row.append((fmt_score(metrics["results"][model][task][shot][metric]), ""))
                    delta = metrics["deltas"][model][task][shot][metric]
                    row.append((fmt_delta(delta), delta_sign(delta)))
                rows.append(row)
    return header, rows


def domain_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    reference, others = metrics["reference"], _others(metrics)
    header = ["Domain", "Shots", "Tasks", reference] + [h for m in others for h in (m, f"Δ {m}")]

    def average(model: str, domain: str, shot: str) -> str:
        entry = metrics["domains"][model][domain][shot]
        return fmt_score(
            {"value": entry["primary"], "ci_low": entry.get("primary_ci_low"), "ci_high": entry.get("primary_ci_high")}
        )

    rows = []
    for domain, by_shot in metrics["domains"][reference].items():
        for shot, entry in by_shot.items():
            row = [(domain, ""), (shot, ""), (str(entry["tasks"]), ""), (average(reference, domain, shot), "")]
            for model in others:
                delta = metrics["domain_deltas"][model][domain][shot]
                row += [(average(model, domain, shot), ""), (fmt_delta(delta), delta_sign(delta))]
            rows.append(row)
    return header, rows


BEST_REFERENCE_TITLE = "Against the reference's best scoring"
BEST_REFERENCE_NOTE = (
    "Each model's headline domain average less the reference's best domain average under either "
    "scoring, with a paired 95% CI: a gain there is more than answer format."
)


def best_reference_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    header = ["Model", "Domain", "Shots", f"{metrics['reference']} best (scoring)", "model", "Δ"]
    rows = []
    for model, by_domain in metrics.get("against_best_reference", {}).items():
        for domain, by_shot in by_domain.items():
            for shot, entry in by_shot.items():
                mine = metrics["domains"][model][domain][shot]["primary"]
                rows.append([
                    (model, ""), (domain, ""), (shot, ""),
                    (f"{entry['reference']:.3f} ({entry['reference_scoring']})", ""),
                    (f"{mine:.3f}", ""),
                    (fmt_delta(entry), delta_sign(entry)),
                ])
    return header, rows


def verdicts(metrics: dict[str, Any]) -> list[str]:
    """One line per compared model: on how many (task, shot) pairs its first metric is
    significantly above, below or level with the reference (paired 95% CI)."""
    lines = []
    for model in _others(metrics):
        signs = [
            delta_sign(metrics["deltas"][model][task][str(shot)][info["metrics"][0]])
            for task, info in metrics["tasks"].items()
            for shot in metrics["shots"]
        ]
        lines.append(
            f"{model} vs {metrics['reference']}, each task's first metric: better on {signs.count('up')}, "
            f"worse on {signs.count('down')}, no significant difference on {signs.count('flat')} "
            f"of {len(signs)} task/shot pairs (paired 95% CI)."
        )
    return lines


SCORING_NAMES = {"loglik": "log-likelihood over the label set", "generate": "generation and label extraction"}


def scorings(metrics: dict[str, Any]) -> list[str]:
    """The document's scorings, headline first (documents before `both` name one)."""
    return metrics.get("scorings") or [metrics["scoring"]]


def scoring_view(metrics: dict[str, Any], scoring: str) -> dict[str, Any]:
    """The document as if it held only `scoring`: its results and domain averages, and
    only the tasks scored that way (for log-likelihood: the choice tasks)."""
    tasks = {t: info for t, info in metrics["tasks"].items() if scoring in info.get("scorings", [scoring])}
    return {**metrics, **metrics["by_scoring"][scoring], "tasks": tasks}


def describe(metrics: dict[str, Any]) -> str:
    ci = (
        f"95% bootstrap CIs ({metrics['bootstrap']} resamples, seed {metrics['seed']})"
        if metrics["bootstrap"]
        else "no confidence intervals (eval.bootstrap=0)"
    )
    headline, *others = scorings(metrics)
    scored = SCORING_NAMES[headline] + "".join(f" (and, reported below, by {SCORING_NAMES[s]})" for s in others)
    return (
        f"Model `{metrics['model_ref']}`; classification scored by {scored}; "
        f"{ci}. Δ is each model minus `{metrics['reference']}` on the same examples, "
        "with a paired bootstrap CI."
    )


def other_scoring_title(scoring: str) -> str:
    return f"Choice tasks scored by {SCORING_NAMES[scoring]}"


OTHER_SCORING_NOTE = (
    "Domain averages here take the choice tasks scored this way and the other tasks as above."
)


# -- markdown ------------------------------------------------------------------
def _markdown_table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(text for text, _ in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(metrics: dict[str, Any]) -> str:
    """The results table (every task, shot and metric) and the per-domain averages."""
    parts = [
        f"# Evaluation: {', '.join(metrics['models'])}",
        "",
        describe(metrics),
        "",
        *[f"- {line}" for line in verdicts(metrics)],
        "",
        _markdown_table(*table_rows(metrics)),
        "",
        "## Domain averages (mean of each task's first metric; tasks resampled independently)",
        "",
        _markdown_table(*domain_rows(metrics)),
    ]
    for scoring in scorings(metrics)[1:]:
        view = scoring_view(metrics, scoring)
        parts += [
            "",
            f"## {other_scoring_title(scoring)}",
            "",
            _markdown_table(*table_rows(view)),
            "",
            OTHER_SCORING_NOTE,
            "",
            _markdown_table(*domain_rows(view)),
        ]
    if metrics.get("against_best_reference"):
        parts += ["", f"## {BEST_REFERENCE_TITLE}", "", BEST_REFERENCE_NOTE, "", _markdown_table(*best_reference_rows(metrics))]
    if metrics.get("command"):
        parts += ["", f"Reproduce: `{metrics['command']}`"]
    return "\n".join(parts) + "\n"


# -- figures -------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def task_figure(metrics: dict[str, Any]) -> str:
    """Each task's first metric per model with 95% CI error bars, one panel per shot count."""
    plt = _pyplot()
    tasks, models, shots = list(metrics["tasks"]), list(metrics["models"]), list(map(str, metrics["shots"]))
    width_in = min(14.0, max(6.0, 0.75 * len(tasks) * max(1.0, len(models) / 2) + 2))
    fig, axes = plt.subplots(len(shots), 1, figsize=(width_in, 3.4 * len(shots)), squeeze=False)
    width = 0.8 / len(models)
    for ax, shot in zip(axes[:, 0], shots):
        for j, model in enumerate(models):
            values, low, high = [], [], []
            for task in tasks:
                score = metrics["results"][model][task][shot][metrics["tasks"][task]["metrics"][0]]
                values.append(score["value"])
                low.append(score["value"] - (score["ci_low"] if score["ci_low"] is not None else score["value"]))
                high.append((score["ci_high"] if score["ci_high"] is not None else score["value"]) - score["value"])
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, values, width, yerr=[low, high], capsize=3, label=model, color=COLORS[j % len(COLORS)])
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([f"{t}\n({metrics['tasks'][t]['metrics'][0]})" for t in tasks], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{shot}-shot", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("score (95% CI)")
    axes[0][0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _png(fig)


def funnel_figure(summary: dict[str, Any]) -> str:
    """Counts through data generation, and the drops by filter and reason."""
    plt = _pyplot()
    counts = summary.get("counts", {})
    drops = [
        (f"{stage}: {reason}", n)
        for stage, reasons in (summary.get("drops") or {}).items()
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])
    ]
    fig, axes = plt.subplots(1, 2 if drops else 1, figsize=(11 if drops else 6, 3.2), squeeze=False)
    names = list(counts)
    axes[0][0].barh(names[::-1], [counts[n] for n in names][::-1], color="#1f77b4")
    for i, name in enumerate(names[::-1]):
        axes[0][0].text(counts[name], i, f" {counts[name]}", va="center", fontsize=8)
    axes[0][0].set_xlim(0, max(counts.values(), default=1) * 1.12)
    axes[0][0].set_title("generation funnel", fontsize=10)
    if drops:
        axes[0][1].barh([d[0] for d in drops][::-1], [d[1] for d in drops][::-1], color="#d62728")
        axes[0][1].set_title("dropped, by reason", fontsize=10)
    for ax in axes[0]:
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def loss_figure(rows: list[dict[str, Any]]) -> str:
    """Training loss per step, with the learning rate on a second axis."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#1f77b4", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if any(r.get("lr") is not None for r in rows):
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in rows], [r.get("lr") for r in rows], color="#ff7f0e", alpha=0.6, lw=1)
        lr_ax.set_ylabel("learning rate", color="#ff7f0e", fontsize=8)
        lr_ax.tick_params(labelsize=7)
    ax.set_title("training loss", fontsize=10)
    return _png(fig)


def read_run_extras(run_dir: RunDir) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The run's generation summary and training metrics, when present."""
    summary_path, train_path = run_dir.path("data", "summary.json"), run_dir.path("train", "metrics.jsonl")
    summary = read_json(summary_path) if exists(summary_path) else None
    train = []
    if exists(train_path):
        for line in read_bytes(train_path).decode().splitlines():
            if line.strip():
                train.append(json.loads(line))
    return summary, train


# -- html ----------------------------------------------------------------------
STYLE = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;
color:#222;line-height:1.4;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.sub{color:#555;margin-top:0}table{border-collapse:collapse;font-size:12.5px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 7px;text-align:left;vertical-align:top}th{background:#f4f4f4}
td.up{background:#e3f4e1;color:#135f13;font-weight:600}td.down{background:#fbe3e3;color:#8a1414;font-weight:600}
td.flat{color:#555}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px;border-radius:3px;font-size:12px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}td.text{max-width:420px;white-space:pre-wrap;
word-break:break-word}.note{color:#666;font-size:12px}
.verdict{background:#f3f7fc;border-left:4px solid #1f77b4;padding:6px 10px;margin:6px 0}
"""


def _html_table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{c}">{html.escape(t)}</td>' if c else f"<td>{html.escape(t)}</td>" for t, c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _answer(record: dict[str, Any]) -> str:
    parsed = record["parsed"]
    if isinstance(parsed, list):  # entities, or [type, mention] pairs of a typed entity task
        text = "; ".join(e if isinstance(e, str) else f"{e[0]}: {e[1]}" for e in parsed)
    else:
        text = "(none)" if parsed is None else str(parsed)
    return f"{text}  [{record['score']:.2f}]"


def sample_table(metrics: dict[str, Any], predictions: dict[str, dict[str, list[dict[str, Any]]]], task: str) -> str:
    """A few examples of one task (lowest shot count), disagreements between models first."""
    models = list(metrics["models"])
    shot = min(metrics["shots"])
    headline, task_scorings = scorings(metrics)[0], metrics["tasks"][task].get("scorings") or scorings(metrics)
    scoring = headline if headline in task_scorings else task_scorings[0]
    by_model = {
        m: [r for r in predictions[m][task] if r["shot"] == shot and r.get("scoring", scoring) == scoring]
        for m in models
    }
    first = by_model[models[0]]
    order = sorted(
        range(len(first)),
        key=lambda i: (len({json.dumps(by_model[m][i]["parsed"]) for m in models}) == 1, i),
    )[:SAMPLES_PER_TASK]
    header = ["id", "input", "gold"] + models
    rows = []
    for i in order:
        prompt = first[i]["prompt"][-1]["content"]
        prompt = prompt if len(prompt) <= 400 else prompt[:400] + " …"
        rows.append(
            [(first[i]["id"], ""), (prompt, "text"), (first[i]["gold"], "text")]
            + [(_answer(by_model[m][i]), "text") for m in models]
        )
    return _html_table(header, rows)


def data_quality_html(profile: dict[str, Any]) -> str:
    """A `data_profile.profile` as HTML: the task-type mix of the data beside the seeds',
    and each task type's label balance, data beside seeds."""
    from selfspec.data_profile import headline, label_counts, task_name

    mix = []
    for task, sides in profile["tasks"].items():
        d, s = sides["examples"], sides["seeds"]
        mix.append([(task_name(task), ""), (str(d["count"]), ""), (f"{d['share']:.1%}", ""), (str(s["count"]), ""), (f"{s['share']:.1%}", "")])
    parts = [
        f"<p class='note'>{html.escape(headline(profile))}</p>",
        _html_table(["Task type", "Examples", "Share", "Seeds", "Seed share"], mix),
    ]
    if profile["labels"]:
        balance = [
            [(task_name(task), ""), (label_counts(sides["examples"]), "text"), (label_counts(sides["seeds"]), "text")]
            for task, sides in profile["labels"].items()
        ]
        parts.append(_html_table(["Task type", "Labels in examples", "Labels in seeds"], balance))
    return "\n".join(parts)


LABEL_CHECK_NOTE = (
    "Label check: before round 1 the model labelled each seed of every label type the way it labels rows "
    "(the other seeds of the type as demos). A type whose labels do not beat the seeds' majority label by "
    "more than chance (p, one-sided binomial, above 0.05) is unreliable: its rows take that label, or are not made."
)


def label_check_rows(checked: dict[str, Any]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """The generation summary's label check: per label type, how the model's labels did on the seeds."""
    from selfspec.data_profile import task_name

    rows = []
    for task, r in checked.items():
        if r["reliable"]:
            verdict, css = "reliable: the model's labels", "flat"
        elif "majority_label" in r:
            verdict, css = f"unreliable: {r['relabelled']} rows answer '{r['majority_label']}'", "down"
        else:
            verdict, css = "unreliable: no rows", "down"
        chance = f"{r['p']:.3f}" if "p" in r else "-"  # runs before the significance test lack it
        rows.append([(task_name(task), ""), (str(r["right"]), ""), (f"{r['prior_right']:g}", ""), (str(r["seeds"]), ""), (chance, ""), (verdict, css)])
    return ["Task type", "Right", "Majority label right", "Seeds", "p (chance)", "Verdict"], rows


def render_html(
    metrics: dict[str, Any], predictions: dict[str, dict[str, list[dict[str, Any]]]], run_dir: RunDir
) -> str:
    """The whole report as one HTML page with inline style and embedded PNG figures."""
    summary, train = read_run_extras(run_dir)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>selfspec evaluation: {html.escape(metrics['run'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Self-specialization evaluation — run <code>{html.escape(metrics['run'])}</code></h1>",
        f"<p class='sub'>{html.escape(describe(metrics)).replace('`', '')}</p>",
        *[f"<p class='verdict'>{html.escape(line)}</p>" for line in verdicts(metrics)],
        "<h2>Domain averages</h2><p class='note'>Mean of each task's first metric, 95% CI with each task resampled independently; "
        "green or red: the paired CI of the difference excludes zero.</p>",
        _html_table(*domain_rows(metrics)),
        "<h2>Per task</h2>",
        _img(task_figure(metrics), "per-task scores with 95% confidence intervals"),
        "<p class='note'>Green: the paired 95% CI of the difference lies above zero; red: below.</p>",
        _html_table(*table_rows(metrics)),
    ]
    for scoring in scorings(metrics)[1:]:
        view = scoring_view(metrics, scoring)
        parts += [
            f"<h2>{html.escape(other_scoring_title(scoring))}</h2>",
            _html_table(*table_rows(view)),
            f"<p class='note'>{html.escape(OTHER_SCORING_NOTE)}</p>",
            _html_table(*domain_rows(view)),
        ]
    if metrics.get("against_best_reference"):
        parts += [
            f"<h2>{BEST_REFERENCE_TITLE}</h2><p class='note'>{html.escape(BEST_REFERENCE_NOTE)}</p>",
            _html_table(*best_reference_rows(metrics)),
        ]
    if summary:
        parts += ["<h2>Data generation</h2>", _img(funnel_figure(summary), "data generation funnel")]
        if summary.get("profile"):
            parts.append(data_quality_html(summary["profile"]))
        if summary.get("label_check"):
            parts += [f"<p class='note'>{html.escape(LABEL_CHECK_NOTE)}</p>", _html_table(*label_check_rows(summary["label_check"]))]
    if train:
        parts += ["<h2>Training</h2>", _img(loss_figure(train), "training loss curve")]
    parts.append("<h2>Sample predictions</h2><p class='note'>Parsed answer and its score; examples where models disagree first.</p>")
    for i, task in enumerate(metrics["tasks"]):
        parts.append(
            f"<details{' open' if i == 0 else ''}><summary>{html.escape(task)}</summary>"
            f"{sample_table(metrics, predictions, task)}</details>"
        )
    footer = [f"{metrics['requests']} requests in {metrics['seconds']} s"]
    for name, path in metrics["models"].items():
        footer.append(f"{name}: {path or metrics['model_ref']}")
    if metrics.get("command"):
        footer.append(f"reproduce: {metrics['command']}")
    parts.append("<h2>Provenance</h2><p class='note'>" + "<br>".join(html.escape(f) for f in footer) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
