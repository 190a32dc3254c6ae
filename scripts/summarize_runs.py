"""Summarise finished training runs: the numbers RESULTS.md reports, read from each run directory.

Per run (a directory with final.json and TensorBoard events): final normalized score and return, best and mean of
the last 10 evaluations, wall clock, dtype; for SPaCQL the run means of w_k and u_k, k_eff, and in how many logged
windows u_1 < ... < u_n and w_1 is the largest; the ensemble spread of the target (last value and run mean).
Runs without final.json (unfinished) are listed as such. With several runs of one (algorithm, task, dataset,
dtype), also the mean and std over seeds of the final score.

    python scripts/summarize_runs.py runs/*
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path) -> dict[str, np.ndarray]:
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: np.array([e.value for e in ea.Scalars(tag)]) for tag in ea.Tags()["scalars"]}


def summarize(run: Path) -> dict | None:
    final = run / "final.json"
    if not final.is_file():
        return None
    result = json.loads(final.read_text())
    scores = np.array([h[2] for h in result["eval_history"]])
    s = scalars(run)
    out = {
        "key": (
            result["algo"],
            result["task"],
            result["dataset"],
            "bf16" if result["args"]["bf16"] else "fp32",
        ),
        "seed": result["seed"],
        "final": result["final_normalized_score"],
        "return": result["final_return"],
        "best": scores.max(),
        "last10": scores[-10:].mean(),
        "wall_s": result["wall_time_s"],
    }
    ks = sorted(int(t.rsplit("_", 1)[1]) for t in s if t.startswith("charts/w_"))
    if ks:
        w = np.stack([s[f"charts/w_{k}"] for k in ks])  # [n, windows]
        u = np.stack([s[f"charts/u_{k}"] for k in ks])
        out["w"] = w.mean(1)
        out["u_last"] = u[:, -1]
        out["u_ordered"] = np.all(np.diff(u, axis=0) > 0, axis=0).mean()
        out["w1_largest"] = (w.argmax(0) == 0).mean()
        out["k_eff"] = s["charts/k_eff"].mean()
    if "charts/target_spread" in s:
        out["spread"] = (s["charts/target_spread"][-1], s["charts/target_spread"].mean())
    return out


def main(paths: list[str]) -> int:
    groups = defaultdict(list)
    for p in map(Path, paths):
        r = summarize(p)
        if r is None:
            print(f"{p.name}: not finished (no final.json)")
            continue
        groups[r["key"]].append(r["final"])
        line = (
            f"{p.name}: final {r['final']:.1f} (return {r['return']:.1f}), best {r['best']:.1f}, "
            f"last-10 mean {r['last10']:.1f}, {r['wall_s']:.0f} s, {r['key'][3]}"
        )
        if "w" in r:
            line += (
                f"\n    w_k {np.round(r['w'], 4).tolist()}, k_eff {r['k_eff']:.2f}, u_k at the end "
                f"{np.round(r['u_last'], 3).tolist()}, u ordered in {r['u_ordered']:.1%} of windows, "
                f"w_1 largest in {r['w1_largest']:.1%}"
            )
        if "spread" in r:
            line += f"\n    target spread: last {r['spread'][0]:.3f}, run mean {r['spread'][1]:.3f}"
        print(line)
    for key, finals in sorted(groups.items()):
        if len(finals) > 1:
            f = np.array(finals)
            print(
                f"{' '.join(key)}: {len(f)} seeds, final {f.mean():.1f} +- {f.std(ddof=1):.1f} (sample std)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
