"""Report of the benchmark results (scripts/benchmark.py): <results-dir>/README.md and PNG figures.

Reads <results-dir>/<algo>/<task>/<dataset>/seed_<k>.json and writes, where the data exist: a table of our final
normalized scores beside the paper's (Tables 1 and 2), rliable aggregates (IQM, probability of improvement),
learning curves, the target spread of Figure 2 and the SPaCQL weights of Figure 3.

    python scripts/report.py                                   # results/ -> results/README.md, results/figures/
    python scripts/report.py --results-dir /tmp/r --suffix _smoke   # the smoke grid's results (cfcql_smoke, ...)
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rliable import library as rly  # noqa: E402
from rliable import metrics  # noqa: E402
from scipy import stats  # noqa: E402

TASKS = ("cn", "pp", "world", "halfcheetah")
DATASETS = ("expert", "medium", "medium-replay", "random")  # the paper's column order
ALGOS = {"CFCQL": ("cfcql",), "ICQL-QS": ("icql_qs",), "SPaCQL": ("spacql_mpe", "spacql_mamujoco")}
PAPER_N = 5  # seeds behind each paper number ("we run all experiments with 5 different random seeds")
# Paper, Table 2 ("The average normalized score on offline MARL tasks"): (task, dataset) -> CFCQL mean, std,
# SPaCQL mean, std
TABLE2 = {
    ("cn", "expert"): (112, 4, 111.9, 4.5),
    ("cn", "medium"): (65.0, 10.2, 78.6, 6.4),
    ("cn", "medium-replay"): (52.2, 9.6, 71.9, 13.2),
    ("cn", "random"): (62.2, 8.1, 78.2, 14),
    ("pp", "expert"): (118.2, 13.1, 111.2, 16.4),
    ("pp", "medium"): (68.5, 21.8, 61.9, 20),
    ("pp", "medium-replay"): (71.1, 6, 75.0, 12.7),
    ("pp", "random"): (78.5, 15.6, 89.4, 13.7),
    ("world", "expert"): (119.7, 26.4, 112.3, 7.8),
    ("world", "medium"): (93.8, 31.8, 98.1, 17.7),
    ("world", "medium-replay"): (73.4, 23.2, 105.2, 11.1),
    ("world", "random"): (68, 20.8, 94.3, 7.4),
    ("halfcheetah", "expert"): (118.5, 4.9, 110.5, 5.9),
    ("halfcheetah", "medium"): (80.5, 9.6, 70.3, 7.8),
    ("halfcheetah", "medium-replay"): (59.5, 8.2, 66.1, 3.4),
    ("halfcheetah", "random"): (39.7, 4.0, 43.8, 4.9),
}
# Paper, Table 1 ("Performance comparison between CFCQL and ICQL-QS"): ICQL-QS means, no std given (its CFCQL
# row repeats Table 2's)
TABLE1_ICQL_QS = {
    ("cn", "expert"): 97.2,
    ("cn", "medium"): 62.5,
    ("cn", "medium-replay"): 58.2,
    ("cn", "random"): 77.7,
    ("world", "expert"): 106.5,
    ("world", "medium"): 88.6,
    ("world", "medium-replay"): 82.5,
    ("world", "random"): 89.9,
}
# (algorithm, task, dataset) -> (mean, std or None)
PAPER = {("CFCQL", *k): v[:2] for k, v in TABLE2.items()}
PAPER |= {("SPaCQL", *k): v[2:] for k, v in TABLE2.items()}
PAPER |= {("ICQL-QS", *k): (v, None) for k, v in TABLE1_ICQL_QS.items()}


def load(results_dir: Path, suffix: str) -> dict:
    """(label, task, dataset) -> results sorted by seed, for the algorithms of ALGOS (+ suffix) and Figure 2's."""
    names = {a + suffix: label for label, algos in ALGOS.items() for a in algos}
    names |= {f"cfcql_e10{suffix}": "CFCQL (E=10)", f"icql_qs_e10{suffix}": "ICQL-QS (E=10)"}
    out = defaultdict(list)
    for path in sorted(results_dir.glob("*/*/*/seed_*.json")):
        r = json.loads(path.read_text())
        if r["algo"] in names:
            out[names[r["algo"]], r["task"], r["dataset"]].append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def cell(scores, paper):
    """'mean ± std (n=k)' and the Welch mark against the paper's (mean, std) with PAPER_N seeds."""
    if not scores:
        return "—"
    m, n = float(np.mean(scores)), len(scores)
    s = float(np.std(scores, ddof=1)) if n > 1 else 0.0
    if n == 1:
        return f"{m:.1f} (n=1)" if paper is None else f"{m:.1f} (n=1, not tested)"
    text = f"{m:.1f} ± {s:.1f} (n={n})"
    if paper is None:
        return text
    if paper[1] is None:
        return text + " (paper: no std, not tested)"
    if s == 0 and paper[1] == 0:
        return text + " (zero spread, not tested)"
    p = stats.ttest_ind_from_stats(m, s, n, paper[0], paper[1], PAPER_N, equal_var=False).pvalue
    return text + (f" **† p={p:.3f}**" if p < 0.05 else "")


def score_table(runs):
    head = "| task | dataset | " + " | ".join(f"{a} ours | {a} paper" for a in ALGOS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(ALGOS))]
    for task in TASKS:
        for d in DATASETS:
            row = [task, d]
            for label in ALGOS:
                paper = PAPER.get((label, task, d))
                scores = [r["final_normalized_score"] for r in runs.get((label, task, d), [])]
                row.append(cell(scores, paper))
                row.append("—" if paper is None else f"{paper[0]}" + (f" ± {paper[1]}" if paper[1] else ""))
            lines.append("| " + " | ".join(row) + " |")
    return lines


def seed_mean(log_means, key):
    """'0.123': the mean over runs of one logged run mean, '—' when no run logged it."""
    vals = [m[key] for m in log_means if key in m]
    return f"{np.mean(vals):.3f}" if vals else "—"


def weights_table(runs):
    """SPaCQL's raw per-run means of w_k, u_k, k_eff and the target spread, averaged over seeds (Figure 3 shows
    w_k min-max normalised, which maps any non-uniform w to 1 ... 0 and hides how close to uniform it is)."""
    head = "| task | dataset | seeds | w_1 / ... / w_n | u_1 / ... / u_n | k_eff | target spread |"
    rows = [head, "|---|---|---|---|---|---|---|"]
    for task in TASKS:
        for d in DATASETS:
            means = [r["log_means"] for r in runs.get(("SPaCQL", task, d), []) if r.get("log_means")]
            ks = sorted({t[9:] for m in means for t in m if t.startswith("charts/w_")}, key=int)
            if ks:
                w = " / ".join(seed_mean(means, f"charts/w_{k}") for k in ks)
                u = " / ".join(seed_mean(means, f"charts/u_{k}") for k in ks)
                k_eff, spread = seed_mean(means, "charts/k_eff"), seed_mean(means, "charts/target_spread")
                rows.append(f"| {task} | {d} | {len(means)} | {w} | {u} | {k_eff} | {spread} |")
    return rows if len(rows) > 2 else ["No SPaCQL run with logged weights."]


def complete_settings(runs, label, settings):
    """(seeds, kept settings, dropped settings): rliable needs the same seeds in every setting, so pick the seed set
    of a setting that maximises seeds x settings holding all of them (ties: more seeds). A grid still running
    (one seed of a new cell) then drops that cell instead of dropping every other cell to one seed."""
    have = {s: {r["seed"] for r in runs[(label, *s)]} for s in settings}
    kept_by = {frozenset(c): [s for s in settings if c <= have[s]] for c in have.values()}
    seeds = max(kept_by, key=lambda c: (len(c) * len(kept_by[c]), len(c), sorted(c)))
    return sorted(seeds), kept_by[seeds], [s for s in settings if s not in kept_by[seeds]]


def score_matrix(runs, label, settings, seeds):
    """[seeds, settings] final normalized scores / 100."""
    by_seed = {s: {r["seed"]: r["final_normalized_score"] for r in runs[(label, *s)]} for s in settings}
    return np.array([[by_seed[s][k] / 100 for s in settings] for k in seeds])


def bootstrap(scores, func, reps):
    """(point, 95% CI) from rliable for one score matrix (or a pair, for func of two). Seeded here: rliable 1.2
    draws its bootstrap indices from numpy's global generator, not from its random_state argument."""
    np.random.seed(0)
    with warnings.catch_warnings():  # arch's notice about RandomState, which rliable passes
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates(
            {0: scores}, func, reps=reps, random_state=np.random.RandomState(0)
        )
    return point[0], ci[0]


def aggregates(runs, reps):
    lines, matrices, dropped = [], {}, []
    for label in ALGOS:
        settings = sorted((t, d) for (lab, t, d) in runs if lab == label)
        if settings:
            seeds, kept, left = complete_settings(runs, label, settings)
            matrices[label] = score_matrix(runs, label, kept, seeds)
            dropped += [
                f"{label} {t} {d} (seeds {sorted(r['seed'] for r in runs[(label, t, d)])})" for t, d in left
            ]
    if not matrices:
        return ["No results to aggregate."]
    iqm = lambda x: np.array([metrics.aggregate_iqm(x)])
    point, ci = {}, {}
    for label, m in matrices.items():  # seeded per algorithm: its CI depends on its own runs only
        point[label], ci[label] = bootstrap(m, iqm, reps)
    lines += ["| algorithm | settings | seeds per setting | IQM | 95% CI |", "|---|---|---|---|---|"]
    for label, m in matrices.items():
        lo, hi = ci[label][:, 0]
        # the bootstrap resamples seeds within each setting: with one seed it has nothing to resample
        interval = f"[{lo:.3f}, {hi:.3f}]" if m.shape[0] > 1 else "none (one seed per setting)"
        lines.append(f"| {label} | {m.shape[1]} | {m.shape[0]} | {point[label][0]:.3f} | {interval} |")
    if dropped:
        lines += ["", "Left out (not the seeds of the other settings): " + ", ".join(dropped) + "."]
    both = sorted((t, d) for (lab, t, d) in runs if lab == "SPaCQL" and ("CFCQL", t, d) in runs)
    if not both:
        return lines + ["", "Probability of improvement SPaCQL > CFCQL: no setting with results of both."]
    seeds_x, kept_x, _ = complete_settings(runs, "SPaCQL", both)
    seeds_y, kept, _ = complete_settings(runs, "CFCQL", kept_x)
    x = score_matrix(runs, "SPaCQL", kept, seeds_x)
    y = score_matrix(runs, "CFCQL", kept, seeds_y)
    point, ci = bootstrap((x, y), metrics.probability_of_improvement, reps)
    lo, hi = np.ravel(ci)
    seeds = min(len(x), len(y))
    interval = f"95% CI [{lo:.3f}, {hi:.3f}]" if seeds > 1 else "no CI (one seed per setting)"
    return lines + [
        "",
        f"Probability of improvement P(SPaCQL > CFCQL), settings with results of both: {len(kept)} of {len(both)}, "
        f"seeds per setting: SPaCQL {len(x)}, CFCQL {len(y)}; {float(point):.3f}, {interval}.",
    ]


def mean_se(series):
    """Series of {x: y} per seed -> (x, mean, standard error) over the x common to all seeds."""
    xs = sorted(set.intersection(*(set(s) for s in series)))
    ys = np.array([[s[x] for x in xs] for s in series], dtype=float)
    se = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros(len(xs))
    return np.array(xs), ys.mean(0), se


def plot_band(ax, series, label):
    x, m, se = mean_se(series)
    ax.plot(x, m, label=f"{label} (n={len(series)})")
    ax.fill_between(x, m - se, m + se, alpha=0.25)


def legend_or_empty(ax):
    """A legend, or "no runs yet" on a panel without data."""
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(xticks=[], yticks=[])


def learning_curves(runs, fig_dir):
    written = []
    for task in TASKS:
        if not any(t == task and lab in ALGOS for lab, t, _ in runs):
            continue
        fig, axes = plt.subplots(1, len(DATASETS), figsize=(4 * len(DATASETS), 3.2), squeeze=False)
        for ax, d in zip(axes[0], DATASETS):
            for label in ALGOS:
                if rs := runs.get((label, task, d)):
                    plot_band(ax, [{h[0]: h[2] for h in r["eval_history"]} for r in rs], label)
            ax.set(title=f"{task} {d}", xlabel="update round", ylabel="normalized score")
            legend_or_empty(ax)
        written.append(save(fig, fig_dir / f"curves_{task}.png"))
    return written


def figure2(runs, fig_dir):
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), squeeze=False)
    any_data = False
    for ax, d in zip(axes[0], ("random", "expert")):
        for label in ("CFCQL (E=10)", "ICQL-QS (E=10)"):
            rs = [
                r for r in runs.get((label, "cn", d), []) if "charts/target_spread" in (r["log_curves"] or {})
            ]
            if rs:
                curves = [
                    dict(zip(r["log_curves"]["round"], r["log_curves"]["charts/target_spread"])) for r in rs
                ]
                plot_band(ax, curves, label)
                any_data = True
        ax.set(title=f"cn {d}", xlabel="update round", ylabel="target spread (ensemble std)")
        legend_or_empty(ax)
    if not any_data:
        plt.close(fig)
        return []
    return [save(fig, fig_dir / "figure2_target_spread.png")]


def figure3(runs, fig_dir):
    """Min-max normalised (across k) run mean of w_k, mean over seeds, per task and dataset type."""
    tasks = {}
    for task in TASKS:
        per_d = {}
        for d in DATASETS:
            means = [r["log_means"] for r in runs.get(("SPaCQL", task, d), []) if r["log_means"]]
            ks = sorted({t for m in means for t in m if t.startswith("charts/w_")}, key=lambda t: int(t[9:]))
            if ks:
                w = np.array([np.mean([m[k] for m in means if k in m]) for k in ks])
                span = w.max() - w.min()
                per_d[d] = (w - w.min()) / span if span > 0 else np.zeros_like(w)
        if per_d:
            tasks[task] = per_d
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
    for ax, (task, per_d) in zip(axes[0], tasks.items()):
        n = max(len(w) for w in per_d.values())
        for k in range(n):
            xs = [i + (k - (n - 1) / 2) * 0.8 / n for i, d in enumerate(per_d)]
            ax.bar(xs, [w[k] if k < len(w) else 0 for w in per_d.values()], 0.8 / n, label=f"w_{k + 1}")
        ax.set_xticks(range(len(per_d)), list(per_d), fontsize=8)
        ax.set(title=f"SPaCQL {task}", ylabel="min-max normalised w_k")
        ax.legend(fontsize=7)
    return [save(fig, fig_dir / "figure3_weights.png")]


def commit_text(meta):
    if meta is None:
        return "unrecorded (older final.json)"
    commit = (meta.get("commit") or "no git")[:12]
    return commit + (" (uncommitted changes)" if meta.get("dirty") else "")


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--suffix", default="", help="result-name suffix, e.g. _smoke for the smoke grid")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (seeded: reproducible)")
    args = p.parse_args()
    results_dir = Path(args.results_dir)
    fig_dir = results_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = load(results_dir, args.suffix)

    expected = [f"curves_{t}.png" for t in TASKS] + ["figure2_target_spread.png", "figure3_weights.png"]
    written = learning_curves(runs, fig_dir) + figure2(runs, fig_dir) + figure3(runs, fig_dir)
    missing = [f for f in expected if fig_dir / f not in written]
    commits = sorted({commit_text(r["meta"]) for rs in runs.values() for r in rs})
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python scripts/report.py --results-dir {args.results_dir}"
        + (f" --suffix {args.suffix}`" if args.suffix else "`")
        + f" from {sum(map(len, runs.values()))} runs of scripts/benchmark.py. Commits of the runs: "
        + (", ".join(commits) if commits else "none")
        + ".",
        "",
        "## Final normalized score, ours beside the paper",
        "",
        "Ours: mean ± sample std over seeds of the final evaluation's normalized score. Paper: Table 2 (CFCQL, "
        "SPaCQL) and Table 1 (ICQL-QS, means only). **†**: our mean differs from the paper's by Welch's t-test, "
        f"two-sided p < 0.05, taking the paper's ± as the sample std of {PAPER_N} seeds (the paper's setup). "
        "Cells with one seed are not tested (n=1), nor those without a paper std.",
        "",
        *score_table(runs),
        "",
        "## Aggregates (rliable)",
        "",
        "Normalized scores / 100, per algorithm over the (task, dataset) settings it has results for. rliable needs "
        "the same seeds in every setting: a setting without them (a cell still running) is left out, and the seed "
        "set kept is the one that keeps the most runs. IQM with 95% stratified-bootstrap percentile CIs; probability of "
        f"improvement over the settings where both have results. {args.reps} bootstrap resamples, "
        "numpy seed 0 for each.",
        "",
        *aggregates(runs, args.reps),
        "",
        "## SPaCQL's mixture weights",
        "",
        "Mean over training of each run's logged w_k and uncertainty u_k (Eq. 7) and k_eff = sum_k k w_k, averaged "
        "over seeds; uniform weights would be 1/n each. Figure 3 below shows the same w_k min-max normalised, as "
        "the paper does.",
        "",
        *weights_table(runs),
        "",
        "## Figures",
        "",
        *[f"- [{f.name}](figures/{f.name})" for f in written],
        *([f"- missing (no data): {', '.join(missing)}"] if missing else []),
        "",
    ]
    (results_dir / "README.md").write_text("\n".join(lines))
    print(
        f"wrote {results_dir / 'README.md'} and {len(written)} figures; missing: {', '.join(missing) or 'none'}"
    )


if __name__ == "__main__":
    main()
