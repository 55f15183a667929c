"""One lever at a time: variants of a config, each fitted, validated and tested, in one table.

Each variant is a name and the options it adds to the config (none for the config as shipped).
Every run is the real ``caltech fit`` (into ``OUT/<variant>``), then ``caltech validate`` and
``caltech test`` of its best checkpoint, with the config's own validation and test settings
(test-time augmentation included unless the variant's options change it). All variants share one
``data.data_dir``, so the archive is extracted once and a variant whose cache (features, or a
trunk's output) another variant computed reuses it: the table says which runs computed theirs,
and its fit minutes (``fit/seconds`` of history.csv, the whole fit) include that pass only there.

    python benchmarks/ablation.py --config configs/partial.yaml --source <archive> --out /tmp/ablation \\
        --variant "shipped=" --variant "no class weights=--model.class_weights none"

A variant already in OUT (its history.csv and test metrics there) is read, not run again, so an
interrupted ablation goes on where it stopped; --again runs them all afresh.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

from common import caltech

from caltech_cli.history import FIT_SECONDS, read_history


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "shipped"


def printed(output: str, name: str) -> float | None:
    found = re.search(rf"^\s*{re.escape(name)}\s+([0-9.e-]+)\s*$", output, re.MULTILINE)
    return float(found.group(1)) if found else None


def run_variant(config: str, source: str, data: Path, folder: Path, options: list[str]) -> dict[str, object]:
    """Fit, validate and test one variant; its figures."""
    common = ["--config", config, "--data.source", source, "--data.data_dir", str(data), "--trainer.logger", "false"]
    common += ["--trainer.default_root_dir", str(folder), "--trainer.enable_progress_bar", "false", *options]
    fit = caltech("fit", *common, cwd=folder.parent)
    best = str(folder / "best.ckpt")
    validated = caltech("validate", *common, "--ckpt_path", best, cwd=folder.parent)
    caltech("test", *common, "--ckpt_path", best, cwd=folder.parent)
    figures = {
        "val/acc": printed(validated.output, "val/acc"),
        "val/acc_macro": printed(validated.output, "val/acc_macro"),
        "computed": "Cached " in fit.output,
    }
    (folder / "ablation.json").write_text(json.dumps(figures))
    return figures


def figures_of(folder: Path) -> dict[str, object]:
    """A finished variant's figures: its validation (``ablation.json``), test and fit time."""
    figures = json.loads((folder / "ablation.json").read_text())
    test = json.loads((folder / "report" / "metrics.json").read_text())
    history = read_history(folder / "history.csv")
    best = max(history, key=lambda row: row.get("val/acc", -1))
    return {
        **figures,
        "test/acc": test["test/acc"],
        "test/acc_macro": test["test/acc_macro"],
        "minutes": history[-1].get(FIT_SECONDS, float("nan")) / 60,
        "epochs": len(history),
        "best epoch": best["epoch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--source", required=True, help="the Caltech-101 archive, or a folder of class folders")
    parser.add_argument("--out", required=True, type=Path, help="a folder for the runs and their data")
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=OPTIONS",
        help="a variant: its name, then the caltech options it adds (shell words), e.g. 'no TTA=--data.tta_flip false'",
    )
    parser.add_argument("--again", action="store_true", help="run every variant, even those already in OUT")
    args = parser.parse_args()
    out = args.out.resolve()
    config = str(Path(args.config).resolve())
    source = str(Path(args.source).resolve())
    rows = []
    for variant in args.variant:
        name, _, options = variant.partition("=")
        folder = out / slug(name)
        if args.again or not (folder / "ablation.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            print(f"== {name}: caltech fit {' '.join(shlex.split(options))}", flush=True)
            run_variant(config, source, out / "data", folder, shlex.split(options))
        rows.append((name, options, figures_of(folder)))
        print(table(rows), flush=True)


def table(rows: list[tuple[str, str, dict[str, object]]]) -> str:
    lines = [
        "| variant | options | val acc | val macro | test acc | test macro | fit minutes | best epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, options, f in rows:
        minutes = f"{f['minutes']:.1f}" + ("" if f["computed"] else " (cache reused)")
        lines.append(
            f"| {name} | `{options}` | {f['val/acc']:.4f} | {f['val/acc_macro']:.4f} | {f['test/acc']:.4f} | "
            f"{f['test/acc_macro']:.4f} | {minutes} | {f['best epoch']} of {f['epochs']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
