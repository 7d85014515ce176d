"""`bpfree`: what the suite holds, the pipeline's stages, and the verdicts of the committed results.

    bpfree list [rules|models|datasets|experiments|claims]
                                                 what can be run and checked, with provenance
    bpfree claims [--profile P]                  verdict table (fits the terminal; verdicts coloured
                                                 on a terminal); exit 1 on a new failure
    bpfree verify [--profile P] [--experiment E ...]
                                                 re-train committed runs in a scratch directory and
                                                 compare them; exit 1 on a difference
    bpfree repro [--profile P] [DVC ARGS ...]    `dvc repro` of the profile's pipeline file (add --dry
                                                 to preview), also in a copy without .git
    bpfree train|tune|launch|bench|prepare|evaluate|report ARGS
                                                 the pipeline's stage itself (`python -m stages.<stage>`):
                                                 every option is the stage's own, `--help` shows them

The stage commands and `verify` / `repro` need a checkout (its params.yaml, dvc.yaml and
stages/) as the working directory and say so otherwise; `list` (but `experiments`) and
`claims` work anywhere (`claims` reads results/ under --results).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

WHAT = ("rules", "models", "datasets", "experiments", "claims")
# command -> (stage module, help): forwarded verbatim to `python -m stages.<module>`, so each
# stage's own argparse parser is the one definition of its options.
STAGE_COMMANDS = {
    "train": ("train", "run an experiment's (rule, seed) runs, as the pipeline does"),
    "tune": ("tune", "learning-rate search on the validation split (writes results/tuning)"),
    "launch": ("launch", "train an experiment's rules side by side as processes (--jobs N)"),
    "bench": ("bench", "step times of every rule against BP, interleaved in one process"),
    "prepare": ("prepare", "prepare a dataset from its raw files (BPFREE_DATA_DIR)"),
    "evaluate": ("evaluate", "summarise a profile's runs into results/<profile>/summary.json"),
    "report": ("tables", "rebuild results/tables, results/figures and results/README.md"),
}
CHECKOUT_FILES = ("params.yaml", "dvc.yaml", "stages/__init__.py")


def _table(rows: list[list], headers: list[str]) -> str:
    from tabulate import tabulate
    return tabulate(rows, headers=headers, tablefmt="github")


VERDICT_COLOURS = {"PASS": "32", "FAIL": "31", "DIVERGED": "35", "NOT RUN": "90"}  # ANSI SGR codes


def terminal_width() -> int | None:
    """The terminal's width, or None when not on a terminal (piped output is not cut)."""
    import os
    import shutil
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return None
    return shutil.get_terminal_size((120, 24)).columns


def use_colour() -> bool:
    """Colour on a terminal only, and never with NO_COLOR set (https://no-color.org)."""
    import os
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def fitted_table(rows: list[list], headers: list[str], width: int | None, colour: bool = False) -> str:
    """A table no wider than `width`: the widest column loses characters first (cut with "…"),
    the first column (the verdict) never; verdicts coloured when asked."""
    rows = [[str(c) for c in r] for r in rows]
    if width:
        floor = [max(len(h) + 2, 8) for h in headers]
        while True:
            # tabulate pads a column to at least its header + 2 (MIN_PADDING)
            widths = [max([len(headers[i]) + 2] + [len(r[i]) for r in rows]) for i in range(len(headers))]
            total = sum(widths) + 3 * len(headers) + 1
            cuttable = [i for i in range(1, len(headers)) if widths[i] > floor[i]]
            if total <= width or not cuttable:
                break
            widest = max(cuttable, key=lambda i: widths[i])
            keep = max(floor[widest], widths[widest] - (total - width)) - 1
            rows = [r[:widest] + [r[widest] if len(r[widest]) <= keep + 1 else r[widest][:keep] + "…"]
                    + r[widest + 1:] for r in rows]
    if colour:
        rows = [[f"\033[{VERDICT_COLOURS[r[0]]}m{r[0]}\033[0m" if r[0] in VERDICT_COLOURS else r[0]] + r[1:]
                for r in rows]
    return _table(rows, headers)


def _experiments_table() -> str:
    """params.yaml's experiments, read as plain YAML (no torch): what each trains, and in which
    profiles it runs or why not."""
    import yaml
    if not Path("params.yaml").is_file():
        return "(no params.yaml here: `bpfree list experiments` reads the checkout's params.yaml; run it from the repository root)"
    params = yaml.safe_load(Path("params.yaml").read_text())
    rows = []
    for exp_id, exp in params["experiments"].items():
        sweep = exp.get("sweep") or {}
        where = [p for p, over in params["profiles"].items() if not (over.get(exp_id) or {}).get("skip")]
        rows.append([exp_id, exp["dataset"], exp["model"]["name"], " ".join(exp["rules"]),
                     f"{sweep['param'].rsplit('.', 1)[-1]} {sweep['values']}" if sweep else "",
                     exp["epochs"], len(exp["seeds"]), ", ".join(where)])
    return _table(rows, ["experiment", "dataset", "model", "rules", "sweep", "epochs", "seeds", "profiles"])


def cmd_list(args) -> int:
    """From bpfree/catalogue.json, claims.yaml and params.yaml: no torch is imported."""
    from bpfree.catalogue import load
    catalogue = load()
    sections = [args.what] if args.what else list(WHAT)
    for what in sections:
        if what == "rules":
            rows = [[r["name"], r["granularity"], r["options"] or "—", r["what"]] for r in catalogue["rules"]]
            print(_table(rows, ["rule", "applies to", "options (defaults)", "what"]))
        elif what == "models":
            print(_table([[m["name"], m["options"]] for m in catalogue["models"]], ["model", "options (defaults)"]))
        elif what == "datasets":
            rows = [[d["name"], d["kind"], d["description"]] for d in catalogue["datasets"]]
            print(_table(rows, ["dataset", "kind", "description"]))
        elif what == "experiments":
            print(_experiments_table())
        else:
            import yaml
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster
            claims = yaml.load(Path(__file__).with_name("claims.yaml").read_text(), Loader=loader)["claims"]
            rows = [[c["id"], c["paper"], c["profile"], c["experiment"],
                     f"{c['provenance']['kind']}: {c['provenance']['source']}"] for c in claims]
            print(_table(rows, ["claim", "paper", "profile", "experiment", "provenance"]))
        print()
    return 0


def cmd_claims(args) -> int:
    from bpfree.claims import PROBLEM_STATUSES, evaluate_all, load_claims, load_summaries, row_status

    from bpfree.claims import ClaimsError
    all_claims = load_claims()
    profiles = sorted({c.profile for c in all_claims})
    if args.profile is not None and args.profile not in profiles:
        raise ClaimsError(f"--profile: unknown profile {args.profile!r}; claims are checked in {', '.join(profiles)}")
    claims = [c for c in all_claims if args.profile in (None, c.profile)]
    summaries = load_summaries(args.results)
    checked = {c.profile for c in claims} & set(summaries)
    if not checked:
        raise ClaimsError(f"no <profile>/summary.json under {args.results} for "
                          f"{args.profile or ', '.join(profiles)}: nothing would be checked (run the "
                          f"pipeline, or give --results the folder that holds the summaries)")
    results = evaluate_all(claims, summaries)
    rows, problems = [], 0
    for result in results:
        for row in result.rows:
            status = row_status(result.claim, row)
            problems += status in PROBLEM_STATUSES
            rows.append([row.verdict, row.claim, row.rule, row.reproduced, row.tolerance, status])
    print(fitted_table(rows, ["verdict", "claim", "check", "reproduced", "tolerance", "status"],
                       width=None if args.wide else terminal_width(), colour=use_colour()))
    if problems:
        print(f"\n{problems} row(s) are new failures or known failures that now pass", file=sys.stderr)
        return 1
    print(f"\nno new failures ({len(rows)} rows; known failures are listed with their reasons in bpfree/claims.yaml)")
    return 0


def in_checkout() -> bool:
    """The working directory is a bpfree checkout (not just any folder with a stages/)."""
    return all(Path(f).is_file() for f in CHECKOUT_FILES)


def _stage(name: str, argv: list[str]) -> int:
    if not in_checkout() or not Path("stages", f"{name}.py").is_file():
        command = next((c for c, (module, _) in STAGE_COMMANDS.items() if module == name), name)
        print(f"error: `bpfree {command}` runs the pipeline stage stages/{name}.py of a checkout: run it "
              f"from the repository root (the directory with {', '.join(CHECKOUT_FILES)})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path.cwd()))
    module = importlib.import_module(f"stages.{name}")
    from bpfree.config import ConfigError
    from bpfree.data import DataError
    try:
        return module.main(argv) or 0
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def cmd_verify(args) -> int:
    """Re-train committed runs into a scratch directory and compare them by bpfree.verify."""
    import contextlib
    import io
    import json
    import tempfile

    if not Path("stages", "train.py").is_file() or not Path("params.yaml").is_file():
        print("error: `bpfree verify` re-trains through the pipeline's stages: run it from the "
              "repository root", file=sys.stderr)
        return 2
    from bpfree.config import DEFAULT_PROFILE, ConfigError, load_params, resolve_experiment
    from bpfree.layout import Layout
    from bpfree.verify import compare_runs
    params = load_params()
    profile = args.profile or DEFAULT_PROFILE
    if profile not in params["profiles"]:
        raise ConfigError("--profile", profile, "unknown profile", list(params["profiles"]))
    experiments = args.experiment or list(params["experiments"])
    for exp_id in experiments:
        if exp_id not in params["experiments"]:
            raise ConfigError("--experiment", exp_id, "unknown experiment", list(params["experiments"]))
    committed_root = Layout(results=Path(args.results)).runs(profile)
    todo = [e for e in experiments if not resolve_experiment(params, e, profile).get("skip")]
    if not any((committed_root / e).glob("*/metrics.json") for e in todo):
        print(f"error: no committed metrics under {committed_root} for {', '.join(experiments)}: "
              f"nothing to verify (run `dvc repro` or `bpfree train` first)", file=sys.stderr)
        return 2
    _prepare_missing({resolve_experiment(params, e, profile)["dataset"] for e in todo})
    scratch = Path(tempfile.mkdtemp(prefix="bpfree-verify-"))
    reproduced = differ = 0
    for exp_id in todo:
        committed = {p.parent.name: p for p in sorted((committed_root / exp_id).glob("*/metrics.json"))}
        if not committed:
            continue
        argv = [exp_id, "--profile", profile, "--force", "--results", str(scratch / "results"),
                "--checkpoints", str(scratch / "checkpoints")]
        if args.rules:
            argv += ["--rules", *[r for r in args.rules]]
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = _stage("train", argv)
        if code:
            print(captured.getvalue()[-2000:], end="")
            return code
        for run_id, path in committed.items():
            if args.rules and not any(run_id.startswith(f"{r}_") for r in args.rules):
                continue
            new = Layout.under(scratch).metrics(profile, exp_id, run_id)
            if not new.is_file():
                print(f"{exp_id}/{run_id}: differs: the current params no longer define this run")
                differ += 1
                continue
            differences = compare_runs(json.loads(path.read_text()), json.loads(new.read_text()))
            if differences:
                differ += 1
                more = f" (+{len(differences) - 3} more)" if len(differences) > 3 else ""
                print(f"{exp_id}/{run_id}: differs: " + "; ".join(map(str, differences[:3])) + more)
            else:
                reproduced += 1
                print(f"{exp_id}/{run_id}: reproduced")
    print(f"{reproduced} reproduced, {differ} differ ({profile} profile; rule: bpfree/verify.py; "
          f"re-trained into {scratch})")
    return 1 if differ else 0


def _prepare_missing(datasets: set[str]) -> None:
    """A fresh clone has no data/prepared/: prepare what the runs to verify need."""
    for dataset in sorted(datasets):
        if not Path("data", "prepared", dataset, "manifest.json").is_file():
            code = _stage("prepare", [dataset])
            if code:
                raise SystemExit(code)


def inside_git_work_tree(root: Path) -> bool:
    from bpfree.provenance import git_output
    return git_output("rev-parse", "--is-inside-work-tree", cwd=root) == "true"  # None: no git, or no repo


def pipeline_file(profile: str | None) -> str:
    """dvc.yaml runs the default profile; pipelines/<profile>/dvc.yaml each other one."""
    from bpfree.config import DEFAULT_PROFILE, ConfigError
    if profile in (None, DEFAULT_PROFILE):
        return "dvc.yaml"
    path = Path("pipelines", profile, "dvc.yaml")
    if not path.is_file():
        known = [DEFAULT_PROFILE] + sorted(p.parent.name for p in Path("pipelines").glob("*/dvc.yaml"))
        raise ConfigError("--profile", profile, "unknown profile (no pipelines/<profile>/dvc.yaml)", known)
    return path.as_posix()


def cmd_repro(args) -> int:
    """`dvc repro` of the profile's pipeline file, then the tables (which read every profile's
    results). No tracked file is edited. Outside a git work tree (a Docker image or an exported
    copy) DVC needs its no-SCM mode, set locally in .dvc/config.local."""
    import subprocess

    root = Path.cwd()
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        print("error: `bpfree repro` runs the pipeline: run it from the repository root "
              "(the directory with dvc.yaml and .dvc/)", file=sys.stderr)
        return 2
    target = pipeline_file(args.profile)
    if not inside_git_work_tree(root):
        print("no git repository here: using DVC's no-SCM mode (.dvc/config.local core.no_scm)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "core.no_scm", "true"], check=True)
    targets = [] if any(not a.startswith("-") for a in args.dvc_args) else [target]  # the user's own
    if args.dry:
        # DVC's own `repro --dry` hashes every dependency through its run cache and stops at
        # the first one not yet made (a fresh clone's prepared data); `status` does not.
        return subprocess.run([sys.executable, "-m", "dvc", "status", *args.dvc_args, *targets]).returncode
    dvc = [sys.executable, "-m", "dvc", "repro"]
    code = subprocess.run(dvc + [*args.dvc_args, *targets]).returncode
    if code or target == "dvc.yaml":
        return code
    return subprocess.run(dvc + ["--single-item", "tables"]).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpfree", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Backpropagation-free learning rules: a library, the papers' experiments and their verdicts.",
        epilog="Reproduce with `dvc repro` (smoke) or `bpfree repro --profile cpu`; see README.md.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="rules, models, datasets, experiments and claims (with provenance)")
    p.add_argument("what", nargs="?", choices=WHAT)
    p.set_defaults(run=cmd_list)
    p = sub.add_parser("verify", help="re-train committed runs into a scratch directory and compare; "
                                      "exit 1 on a difference",
                       description="Re-trains the committed runs of a profile (or of some experiments) "
                                   "into a temporary directory and compares each with its committed "
                                   "metrics.json by the per-quantity rule of bpfree/verify.py (images for "
                                   "accuracies, degrees for angles, relative for losses). One line per run.")
    p.add_argument("--profile", help="smoke, cpu or gpu (default: params.yaml's profile)")
    p.add_argument("--experiment", nargs="*", help="only these experiments (default: all of the profile)")
    p.add_argument("--rules", nargs="*", help="only these rules")
    p.add_argument("--results", default="results", help="committed results directory (default: results)")
    p.set_defaults(run=cmd_verify)
    p = sub.add_parser("claims", help="verdicts of the committed results; exit 1 on a new failure")
    p.add_argument("--profile", help="only claims checked in this profile")
    p.add_argument("--wide", action="store_true", help="do not cut the table to the terminal's width")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.set_defaults(run=cmd_claims)
    p = sub.add_parser("repro", help="run the pipeline (`dvc repro`), with or without a git repository",
                       description="Runs `dvc repro` with the given arguments. Outside a git work tree it "
                                   "first turns on DVC's no-SCM mode. The Docker image's default command.")
    p.add_argument("--profile", help="smoke (dvc.yaml, the default) or cpu / gpu (pipelines/<profile>/dvc.yaml, "
                                     "then the tables); no tracked file is edited")
    p.add_argument("--dry", action="store_true",
                   help="preview: which stages of the profile's pipeline would run, and why (`dvc status`)")
    p.add_argument("dvc_args", nargs="*", metavar="DVC ARGS",
                   help="anything else is passed to `dvc repro` (e.g. --dry, a stage name)")
    p.set_defaults(run=cmd_repro)
    for command, (module, text) in STAGE_COMMANDS.items():  # listed here; main() forwards them
        p = sub.add_parser(command, help=f"{text} (stages/{module}.py; `bpfree {command} --help`)", add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STAGE_COMMANDS:  # the stage parses its own options, all of them
        return _stage(STAGE_COMMANDS[argv[0]][0], argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "repro":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "repro":
        args.dvc_args = unknown + args.dvc_args  # dvc's own options pass through
    try:
        return args.run(args)
    except Exception as error:  # noqa: BLE001 - only bpfree's own input errors become one line
        if not is_input_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


USER_ERRORS = {("bpfree.config", "ConfigError"), ("bpfree.data.errors", "DataError"),
               ("bpfree.claims", "ClaimsError")}


def is_input_error(error: BaseException) -> bool:
    """bpfree's bad-input errors (one line for the user), recognised without importing the
    modules that define them, so commands that never load torch stay fast."""
    return any((cls.__module__, cls.__name__) in USER_ERRORS for cls in type(error).__mro__)


if __name__ == "__main__":
    sys.exit(main())
