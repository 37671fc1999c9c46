"""`persona experiments` and `persona exposures export`: experiment results as a table
or a plot, changes to the running experiment, and the exposure log as a file. They
read and write the store the command acts on (the running stack's), like `persona
model`."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

from persona.settings import Settings
from serving import experiments


def _ci(cell: dict | None, digits: int = 4) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    lo, hi = cell["ci95"]
    return f"{cell['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_table(report: dict) -> str:
    """The results of one experiment as a plain-text table."""
    head = (
        f"experiment {report['name']} ({'running' if report['running'] else 'stopped'}), "
        f"control {report['control']}, salt {report['salt']!r}"
    )
    rows = [
        (
            "variant",
            "share",
            "users",
            "exposures",
            "clicks/exposure [95% CI]",
            "saves/exp",
            "hides/exp",
            "engagement rate per user [95% CI]",
            "vs control [always-valid 95% CI]",
            "p (always valid)",
        )
    ]
    for name, v in report["variants"].items():
        cmp = v.get("vs_control")
        rows.append(
            (
                name,
                f"{report['shares'].get(name, 0):g}%",
                str(v["users"]),
                str(v["exposures"]),
                _ci(v["clicks_per_exposure"]),
                f"{v['saves_per_exposure']['mean'] or 0:.4f}",
                f"{v['hides_per_exposure']['mean'] or 0:.4f}",
                _ci(v["engagement_rate"]),
                "-"
                if not cmp
                else f"{cmp['difference']:+.4f} [{cmp['ci95'][0]:+.4f}, {cmp['ci95'][1]:+.4f}]"
                + (" *" if cmp["significant"] else ""),
                "-" if not cmp else f"{cmp['p_value']:.3g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append(
        "* significant: the mSPRT's always-valid test at 5%, valid however often it is read"
    )
    lines.append("changes:")
    lines += [f"  #{c['seq']} {c['by']}: {c['what']}" for c in report["changes"]]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> Path:
    """The engagement rate per user over time (cumulative), per variant, with its 95%
    interval, into a PNG (needs matplotlib: pip install 'persona[test]')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report.get("series") or []
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    start = report["started"]
    for name in report["variants"]:
        pts = [(p["at"] - start, p["variants"][name]["engagement_rate"]) for p in series]
        pts = [(t, r) for t, r in pts if r.get("mean") is not None]
        if not pts:
            continue
        t = [p[0] / 60.0 for p in pts]
        mean = [p[1]["mean"] for p in pts]
        ax.plot(t, mean, marker="o", markersize=3, label=name)
        ax.fill_between(
            t, [p[1]["ci95"][0] for p in pts], [p[1]["ci95"][1] for p in pts], alpha=0.2
        )
    ax.set_xlabel("minutes since the experiment started")
    ax.set_ylabel("engagements per exposure, per user")
    ax.set_title(f"experiment {report['name']}: engagement rate with its 95% interval")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def parse_shares(text: str) -> dict[str, float]:
    """``control=50,b=50`` -> {"control": 50.0, "b": 50.0}."""
    shares = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        shares[name.strip()] = float(share)
    return shares


def run(settings: Settings, store, args) -> int:
    initial = settings.experiments
    if args.set:
        blends = {}
        for spec in args.blend or []:
            name, _, blend = spec.partition("=")
            blends[name] = json.loads(blend)
        change = experiments.apply_change(
            store,
            initial,
            f"cli:{getpass.getuser()}",
            shares=parse_shares(args.set),
            blends=blends,
            name=args.name,
            salt=args.salt,
            control=args.control,
        )
        print(f"#{change.seq} {change.experiment.name}: {change.what}")
        return 0
    if not args.name:
        for row in experiments.listing(store, initial):
            shares = ", ".join(f"{n} {s:g}%" for n, s in row["shares"].items())
            print(f"{'*' if row['running'] else ' '} {row['name']}  {shares}")
        return 0
    try:
        report = experiments.report(store, initial, args.name, points=20 if args.plot else 0)
    except KeyError:
        print(f"persona: no experiment {args.name!r}")
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if args.plot:
        print(f"plot: {plot(report, Path(args.plot))}")
    return 0


def export_exposures(store, out: Path, since: float = 0.0, until: float | None = None) -> int:
    """Every unexpired exposure in [since, until] as JSON lines; returns the count."""
    import time

    from actors.attribution import Exposure

    until = time.time() if until is None else until
    count = 0
    with out.open("w") as f:
        for _, _, blob in store.scan_exposures(since, until):
            f.write(json.dumps(Exposure.decode(blob).as_dict()) + "\n")
            count += 1
    return count
