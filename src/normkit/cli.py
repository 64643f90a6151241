"""The ``normkit`` command: ``train``, ``test``, ``recipes``, ``compare``, ``report``, ``bench``.

Each subcommand is a ``(name, add_arguments, handler)`` entry of :data:`COMMANDS`; a handler gets the parsed
namespace and the subcommand's parser (for argparse-style errors) and returns the exit status. Argument
errors print the one-line usage and the message (exit 2); runtime failures (a corrupt checkpoint, a full disk,
an occupied --out) print one line (exit 1); Ctrl-C says how to resume (exit 130). Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_or_import_path(kind: str) -> Callable[[str], str]:
    """argparse type of --data / --model: a built-in name or your own ``package.module:factory``."""
    from normkit.train.runner import CHOICES, is_import_path

    def parse(text: str) -> str:
        if text in CHOICES[kind] or is_import_path(text):
            return text
        raise argparse.ArgumentTypeError(
            f"invalid choice {text!r} (choose from {', '.join(CHOICES[kind])}, or give your own as "
            "package.module:factory)"
        )

    parse.__name__ = kind
    return parse


def _own_help(kind: str, text: str) -> str:
    from normkit.train.runner import CHOICES

    return f"{text}: {', '.join(CHOICES[kind])}, or your own as package.module:factory"


# ------------------------------------------------------------------------------------------------ train


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from normkit.train.runner import CHOICES

    S = argparse.SUPPRESS  # only flags given on the command line override the recipe / config file
    p.add_argument(
        "--recipe", default=S, metavar="NAME", help="start from a named preset (`normkit recipes`)"
    )
    p.add_argument("--config", default=None, metavar="FILE", help="start from a config.json")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/NAME-seedS)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR bit-exactly")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a finished or other run already in --out"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm bars")

    d = p.add_argument_group("data")
    d.add_argument(
        "--data", type=_name_or_import_path("data"), default=S, help=_own_help("data", "dataset (digits)")
    )
    d.add_argument("--data-dir", default=S, metavar="DIR", help="where dataset files are (default ./data)")
    d.add_argument("--download", action="store_true", default=S, help="download the dataset if missing")
    d.add_argument("--val-size", type=int, default=S, metavar="N", help="hold out N training examples")
    d.add_argument("--mnist1d-samples", type=int, default=S, metavar="N", help="MNIST-1D sample count (5000)")
    d.add_argument("--svhn-extra", action="store_true", default=S, help="SVHN: train on train + extra")
    d.add_argument("--subset", type=int, default=S, metavar="N", help="use only N training examples")
    d.add_argument(
        "--batch-classes",
        type=int,
        default=S,
        metavar="K",
        help="non-i.i.d. minibatches: each drawn from only K classes (the BRN paper's experiment)",
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        type=_name_or_import_path("model"),
        default=S,
        help=_own_help("model", "architecture (cnn)"),
    )
    m.add_argument("--depth", type=int, default=S, help="MLP hidden layers / WRN depth")
    m.add_argument("--width", type=int, default=S, help="layer width / base channels")
    m.add_argument("--widen-factor", type=int, default=S, help="WRN widen factor")
    m.add_argument("--dropout", type=float, default=S)
    m.add_argument("--norm", choices=CHOICES["norm"], default=S, help="normalization layers (model default)")
    m.add_argument("--brn-r-max", type=float, default=S, help="BRN final r_max (3)")
    m.add_argument("--brn-d-max", type=float, default=S, help="BRN final d_max (5)")
    m.add_argument("--brn-warmup-steps", type=int, default=S, help="BRN steps at r_max 1, d_max 0 (5000)")
    m.add_argument("--brn-r-max-steps", type=int, default=S, help="BRN step where r_max is reached (40000)")
    m.add_argument("--brn-d-max-steps", type=int, default=S, help="BRN step where d_max is reached (25000)")
    m.add_argument("--brn-momentum", type=float, default=S, help="BRN moving-average weight (0.01)")
    m.add_argument("--brn-virtual-batch-size", type=int, default=S, help="BRN ghost batch size")

    t = p.add_argument_group("techniques and optimization")
    t.add_argument("--init", choices=CHOICES["init"], default=S)
    t.add_argument("--lsuv-tol", type=float, default=S)
    t.add_argument("--lsuv-max-iters", type=int, default=S)
    t.add_argument("--epochs", type=int, default=S)
    t.add_argument("--batch-size", type=int, default=S, help="global batch size")
    t.add_argument("--optimizer", choices=CHOICES["optimizer"], default=S)
    t.add_argument("--lr", type=float, default=S, help="learning rate (Euclidean weights for sgdg/adamg)")
    t.add_argument("--lr-g", type=float, default=S, help="Grassmann learning rate (sgdg/adamg)")
    t.add_argument("--momentum", type=float, default=S)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S)
    t.add_argument("--weight-decay", type=float, default=S)
    t.add_argument(
        "--decay-norm-and-bias",
        action="store_true",
        default=S,
        help="weight decay on biases and norm affines too",
    )
    t.add_argument("--grad-clip", type=float, default=S, help="Grassmann tangent clip ν (sgdg/adamg)")
    t.add_argument("--omega", type=float, default=S, help="Grassmann orthogonality weight ω (sgdg/adamg)")
    t.add_argument("--grassmann-select", choices=CHOICES["grassmann_select"], default=S)
    t.add_argument("--enorm", type=float, default=S, metavar="C", help="ENorm asymmetry c (0 = off)")
    t.add_argument("--enorm-every", type=int, default=S, metavar="K", help="one ENorm cycle every K steps")
    t.add_argument(
        "--enorm-norm-layers",
        choices=CHOICES["enorm_norm_layers"],
        default=S,
        help="ENorm across BatchNorm: stop (default, function kept), ignore (the authors), affine (γ, β)",
    )
    t.add_argument(
        "--enorm-bias", choices=CHOICES["enorm_bias"], default=S, help="ENorm: scale biases (default) or keep"
    )
    t.add_argument(
        "--normalize", choices=CHOICES["normalize"], default=S, metavar="NORM", help="normalized gradients"
    )
    t.add_argument("--clip", choices=CHOICES["clip"], default=S, metavar="NORM", help="clipped gradients")
    t.add_argument("--clipnorm", type=float, default=S, metavar="X", help="clipping threshold for --clip")
    t.add_argument("--granularity", choices=CHOICES["granularity"], default=S)
    t.add_argument(
        "--projection",
        choices=CHOICES["projection"],
        default=S,
        help="sgdp/adamp: cosine test or graph groups",
    )
    t.add_argument("--trust-coefficient", type=float, default=S, help="lars: trust coefficient η (0.001)")
    t.add_argument("--trust-clip", action="store_true", default=S, help="lars: LARC's clipping mode")
    t.add_argument("--schedule", choices=CHOICES["schedule"], default=S, help="LR schedule (default cosine)")
    t.add_argument("--milestones", type=_int_list, default=S, help="multistep epochs, e.g. 60,120,160")
    t.add_argument("--gamma", type=float, default=S, help="multistep factor")
    t.add_argument("--warmup-epochs", type=float, default=S)
    t.add_argument("--label-smoothing", type=float, default=S)

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=S)
    r.add_argument("--device", default=S, help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    r.add_argument("--amp", choices=CHOICES["amp"], default=S, help="autocast precision")
    r.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    r.add_argument("--channels-last", action="store_true", default=S)
    r.add_argument("--sync-bn", action="store_true", default=S, help="synchronized BN/BRN under torchrun")
    r.add_argument(
        "--fsdp", action="store_true", default=S, help="under torchrun: shard the model with FSDP2, not DDP"
    )
    r.add_argument("--eval-batch-size", type=int, default=S)
    r.add_argument(
        "--threads", type=int, default=S, help="CPU intra-op threads (default: 1 for small models on CPU)"
    )
    r.add_argument("--max-steps", type=int, default=S, help="stop after this many optimizer steps")
    r.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


_NOT_CONFIG = {"config", "out", "resume", "progress", "stop_after_epoch", "command", "overwrite"}


class Failure(Exception):
    """A runtime failure reported as one line (no usage, no traceback), exit status 1."""


def _runtime_errors() -> tuple[type[BaseException], ...]:
    from normkit.train.runner import CheckpointError, RunDirError, RunFileError
    from normkit.train.study import WorkerDied

    return (CheckpointError, RunFileError, RunDirError, WorkerDied)


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from normkit.train.runner import (
        ConfigError,
        MissingDataError,
        MissingDependencyError,
        UserCodeError,
        resolve_config,
        run,
    )

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    base: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                base = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"cannot read --config {args.config}: {e}")
    try:
        if args.resume:
            result = run(
                overrides,
                args.out,
                resume=args.resume,
                progress=args.progress,
                stop_after_epoch=args.stop_after_epoch,
            )
        else:
            if "recipe" in overrides and "recipe" in base and overrides["recipe"] != base["recipe"]:
                base = {}
            cfg = resolve_config(base, **overrides)
            result = run(
                cfg,
                args.out,
                overwrite=args.overwrite,
                progress=args.progress,
                stop_after_epoch=args.stop_after_epoch,
            )
    except _runtime_errors() as e:
        raise Failure(str(e)) from None
    except UserCodeError as e:
        _user_traceback(e)
    except (ConfigError, MissingDataError, MissingDependencyError, FileNotFoundError) as e:
        parser.error(str(e))
    except ValueError as e:
        parser.error(str(e))
    if result.summary and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks for all
        print(_done_line(result.summary) + (f" -> {result.out_dir}" if result.out_dir else ""), flush=True)
    return 0


def _done_line(s: dict[str, Any]) -> str:
    """The last line of ``normkit train``: a diverged run is a result too (its summary says so)."""

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "n/a"

    if s.get("diverged"):
        best = (
            f"; best {pct(s['best_acc'])} at epoch {s['best_epoch']}" if s.get("best_acc") is not None else ""
        )
        return (
            f"done: diverged at epoch {s.get('epochs_done')} (training loss not finite), test acc "
            f"{pct(s.get('final_test_acc'))}{best}; the run is recorded as diverged"
        )
    best = f"best {pct(s['best_acc'])} on {s['best_on']} at epoch {s['best_epoch']}"
    return f"done: test acc {pct(s['final_test_acc'])} ({best})"


def _user_traceback(e: Any) -> None:
    """Your factory raised: its frames (not normkit's), then one line of context; exit status 1."""
    sys.stderr.write(e.user_traceback())
    raise Failure(str(e)) from None


# ------------------------------------------------------------------------------------------------- test


def _add_test_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, metavar="PATH", help="checkpoint file or run directory")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="override the run's data directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_test(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from normkit.train.runner import MissingDataError, MissingDependencyError, evaluate_checkpoint

    try:
        res = evaluate_checkpoint(args.load, data_dir=args.data_dir, device=args.device, split=args.split)
    except _runtime_errors() as e:
        raise Failure(str(e)) from None
    except (MissingDataError, MissingDependencyError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['checkpoint']} (epoch {res['epoch']}): {args.split} loss {res[f'{args.split}_loss']:.4f} "
            f"acc {100 * res[f'{args.split}_acc']:.2f}%"
        )
    return 0


# ---------------------------------------------------------------------------------------------- recipes


def _add_recipes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one recipe's full config")
    p.add_argument(
        "--tag", default=None, help="only recipes with this tag (rbn, enorm, lsuv, brn, normalized ...)"
    )
    p.add_argument("--json", action="store_true")


def _run_recipes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from normkit.train.runner import RECIPES, get_recipe, resolve_config

    if args.name:
        try:
            r = get_recipe(args.name)
        except ValueError as e:
            parser.error(str(e))
        cfg = resolve_config(recipe=r.name).to_dict()
        info = {
            "name": r.name,
            "reproduces": r.reproduces,
            "paper_number": r.paper_number,
            "seed_command": r.seed_command,
            "notes": r.notes,
            "config": cfg,
        }
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k in ("name", "reproduces", "paper_number", "seed_command", "notes"):
                if info[k]:
                    print(f"{k.replace('_', ' ')}: {info[k]}")
            print("config:")
            for k, v in cfg.items():
                print(f"  {k} = {v!r}")
        return 0
    recipes = [r for r in RECIPES.values() if args.tag is None or args.tag in r.tags]
    if args.json:
        print(
            json.dumps(
                [{"name": r.name, "reproduces": r.reproduces, "number": r.paper_number} for r in recipes]
            )
        )
        return 0
    width = max((len(r.name) for r in recipes), default=10)
    for r in recipes:
        number = f" — {r.paper_number}" if r.paper_number else ""
        print(f"{r.name:<{width}}  {r.reproduces}{number}")
    return 0


# ---------------------------------------------------------------------------------------------- compare


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from normkit.train.study import SUITES

    what = p.add_mutually_exclusive_group()
    what.add_argument("--suite", choices=list(SUITES), help="a named study (default: default)")
    what.add_argument(
        "--methods",
        type=lambda t: [m for m in t.split(",") if m],
        metavar="M1,M2,...",
        help="compare these methods (the first is the baseline) on the suite's base setting",
    )
    p.add_argument("--method-file", metavar="FILE", help="JSON or TOML file of your own methods")
    p.add_argument("--list", action="store_true", help="list methods and suites, then exit")
    p.add_argument(
        "--data", type=_name_or_import_path("data"), help=_own_help("data", "dataset for every arm")
    )
    p.add_argument(
        "--model", type=_name_or_import_path("model"), help=_own_help("model", "model for every arm")
    )
    p.add_argument(
        "--download", action="store_true", help="fetch the datasets the runs need first (torchvision files)"
    )
    p.add_argument("--data-dir", help="where dataset files are (e.g. the folder of MNIST's idx files)")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the suite's)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the suite's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--out", help="output directory (default runs/compare-SUITE)")
    c = p.add_argument_group("cluster (--launcher submitit; needs normkit[cluster])")
    c.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="where the runs execute: this machine (default) or one scheduler job per run through submitit",
    )
    c.add_argument(
        "--cluster", choices=("slurm", "local"), default="slurm", help="submitit's cluster (default slurm)"
    )
    c.add_argument("--partition", help="Slurm partition of every job")
    c.add_argument("--gpus-per-job", type=int, default=0, metavar="N", help="GPUs per job (default 0)")
    c.add_argument("--cpus-per-job", type=int, default=2, metavar="N", help="CPU cores per job (default 2)")
    c.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit per job in minutes (60)")
    c.add_argument(
        "--max-running",
        type=int,
        metavar="N",
        help="jobs in flight at once (default: all on Slurm, --jobs on the local cluster)",
    )
    p.add_argument("--html", action="store_true", help="also write report.html with embedded plots")
    p.add_argument(
        "--overwrite", action="store_true", help="rerun runs in --out that were made with other settings"
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="one bar over all runs"
    )


def _run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from normkit.train.runner import ConfigError, MissingDataError, MissingDependencyError, UserCodeError
    from normkit.train.study import SUITES, StudyInterrupted, compare, describe_methods, load_method_file

    try:
        if args.list:
            extra = load_method_file(args.method_file) if args.method_file else None
            print(describe_methods(extra), end="")
            return 0
        suite = SUITES[args.suite or "default"]
        overrides = {
            k: getattr(args, k)
            for k in ("data", "model", "epochs", "data_dir")
            if getattr(args, k) is not None
        }
        name = "custom" if args.methods else suite.name
        out = args.out or f"runs/compare-{name}"
        executor = _cluster_executor(args, parser, out)
        if args.download:
            _fetch_datasets(suite, args, overrides)
        result = compare(
            suite,
            out,
            methods=args.methods,
            method_file=args.method_file,
            overrides=overrides,
            seeds=args.seeds,
            jobs=args.jobs,
            html=args.html,
            overwrite=args.overwrite,
            progress=args.progress,
            executor=executor,
        )
    except _runtime_errors() as e:
        raise Failure(str(e)) from None
    except UserCodeError as e:
        _user_traceback(e)
    except StudyInterrupted:
        raise  # main() prints its one line (how to resume) and exits with 130, as for any Ctrl-C
    except KeyboardInterrupt:
        raise StudyInterrupted(
            "interrupted: finished runs are kept and an interrupted one resumes from its last epoch; "
            "run the same command again to continue"
        ) from None
    except (ConfigError, MissingDataError, MissingDependencyError) as exc:
        parser.error(str(exc))
    if result.suite.kind != "rl":  # the RL suite prints its own returns
        from normkit.train.study.report import terminal_summary

        print("\n" + terminal_summary(result), flush=True)
    return 0


def _cluster_executor(args: argparse.Namespace, parser: argparse.ArgumentParser, out: str) -> Any:
    """The executor of ``--launcher submitit`` (None: this machine); cluster flags alone are refused."""
    cluster_flags = ("partition", "max_running")
    if args.launcher != "submitit":
        given = [f"--{k.replace('_', '-')}" for k in cluster_flags if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply with --launcher submitit")
        return None
    from normkit.train.study.cluster import ClusterOptions, SubmititExecutor

    try:
        options = ClusterOptions(
            cluster=args.cluster,
            partition=args.partition,
            gpus_per_job=args.gpus_per_job,
            cpus_per_job=args.cpus_per_job,
            time_min=args.time,
            max_running=args.max_running
            if args.max_running is not None
            else (args.jobs if args.cluster == "local" else None),
        )
    except ValueError as exc:
        parser.error(str(exc))
    return SubmititExecutor(os.path.join(out, ".submitit"), options)


def _fetch_datasets(suite: Any, args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Download the built-in datasets the planned runs need, once, before any run starts (the runs themselves
    keep download off, so their configs match those of runs made without --download)."""
    from normkit.train.runner import is_import_path
    from normkit.train.runner.data import load_dataset  # looked up at call time (tests replace it)
    from normkit.train.study import load_method_file, plan

    extra = load_method_file(args.method_file) if args.method_file else None
    _, jobs = plan(suite, methods=args.methods, extra_methods=extra, overrides=overrides, seeds=1)
    needed = {(j.config["data"], j.config["data_dir"], j.config["svhn_extra"]) for j in jobs}
    for data, data_dir, svhn_extra in sorted(needed):
        if not is_import_path(data):
            load_dataset(data, data_dir, download=True, svhn_extra=svhn_extra)


# ----------------------------------------------------------------------------------------------- report


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", metavar="DIR", help="a folder of study folders, each with a results.csv")
    p.add_argument(
        "--markdown",
        metavar="FILE",
        default=None,
        help="the Markdown file whose marked tables to rewrite (default: DIR/../results.md)",
    )
    p.add_argument(
        "--also",
        metavar="FILE",
        action="append",
        default=[],
        help="another Markdown file (e.g. README.md) whose existing marked tables to rewrite too",
    )


def _run_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from normkit.train.study.results import load_studies, update_results_markdown

    root = Path(args.results)
    if not root.is_dir():
        parser.error(f"{root} is not a directory of studies (e.g. docs/results)")
    target = Path(args.markdown) if args.markdown else root.parent / "results.md"
    also = [Path(f) for f in args.also]
    # every refusal comes before the first file is written
    missing = [str(p) for p in also if not p.is_file()]
    if missing:
        raise Failure(f"--also {', '.join(missing)}: no such file (nothing was written)")
    if not target.parent.is_dir():
        raise Failure(f"--markdown {target}: the folder {target.parent} does not exist (nothing was written)")
    try:
        _, provenance = load_studies(root)  # every results.csv is read and checked here
        for path, append in [(target, True), *((p, False) for p in also)]:
            names = update_results_markdown(root, path, append=append)
            print(f"rewrote {len(names)} table(s) in {path}: {', '.join(names) or 'none marked'}")
    except (ValueError, OSError) as e:
        raise Failure(str(e)) from None
    for name, p in provenance.items():
        print(f"  {name}: code {p.label.replace('`', '')}")
    old = [name for name, p in provenance.items() if p.stale is not False]
    if old:
        print(
            f"warning: {len(old)} table(s) may not match this code ({', '.join(old)}): stale = recorded with "
            "other source, unverified = recorded before runs kept a source hash; rerun those suites",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------------------------ bench


def _benchmarks(root: Any) -> dict[str, str]:
    """The benchmarks of the checkout at ``root``: name -> its TITLE, read from the source (never imported:
    the installed package does not import ``benchmarks/``)."""
    import ast

    found = {}
    for path in sorted(root.glob("benchmarks/bench_*.py")):
        title = ""
        try:
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "TITLE" for t in node.targets
                ):
                    title = str(ast.literal_eval(node.value))
        except (OSError, SyntaxError, ValueError):
            pass
        found[path.stem.removeprefix("bench_")] = title
    return found


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("names", nargs="*", help="benchmarks to run (default: all of them, listed below)")
    p.add_argument("--quick", action="store_true", help="few repetitions; do not write BENCHMARKS.md")
    found = _benchmarks(Path.cwd())
    width = max(map(len, found), default=0)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "benchmarks (benchmarks/bench_NAME.py in this checkout):\n"
        + "".join(f"  {name:<{width}}  {title}\n" for name, title in found.items())
        if found
        else f"benchmarks: none in {Path.cwd()} (no benchmarks/bench_*.py); run from a normkit checkout"
    )


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # The benchmarks compare against PyTorch and PyPI peers; they live in the source checkout, not in the
    # installed package, which never imports them: they run as their own process (`python -m benchmarks.run`).
    import subprocess
    from pathlib import Path

    root = Path.cwd()
    if not (root / "benchmarks" / "run.py").is_file():
        parser.error(
            f"the benchmarks are not part of the installed package and {root} holds no benchmarks/run.py: "
            "run `normkit bench` (or `python -m benchmarks.run`) from the root of a normkit checkout"
        )
    command = [sys.executable, "-m", "benchmarks.run", *args.names, *(["--quick"] if args.quick else [])]
    return subprocess.run(command, cwd=root).returncode


COMMANDS: list[Command] = [
    Command(
        "train", "train a model (a recipe or any combination of techniques)", _add_train_arguments, _run_train
    ),
    Command("test", "evaluate a checkpoint", _add_test_arguments, _run_test),
    Command(
        "recipes", "list the named presets and what each reproduces", _add_recipes_arguments, _run_recipes
    ),
    Command(
        "compare",
        "compare methods side by side over several seeds: report, CSV and plots",
        _add_compare_arguments,
        _run_compare,
    ),
    Command(
        "report",
        "rewrite the generated verdict tables of a results.md from each study's results.csv",
        _add_report_arguments,
        _run_report,
    ),
    Command(
        "bench",
        "measure each technique against its PyTorch reference and record BENCHMARKS.md (from a checkout)",
        _add_bench_arguments,
        _run_bench,
    ),
]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    # allow_abbrev=False: `compare --seed 3` must not be read as --seeds, nor `train --epoch 3` as --epochs
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="Scale control for deep-network training: train, test, compare.",
        allow_abbrev=False,
    )
    from normkit import __version__

    parser.add_argument("--version", action="version", version=f"normkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers: dict[str, argparse.ArgumentParser] = {}
    for cmd in COMMANDS:
        # a one-line usage: an argument error must not dump every option (`-h` lists them)
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            usage=f"normkit {cmd.name} [options] (-h for help)",
            allow_abbrev=False,
        )
        cmd.add_arguments(p)
        parsers[cmd.name] = p
    return parser, parsers


def _refuse_unknown(unknown: list[str], parser: argparse.ArgumentParser) -> None:
    """Exit 2 naming the first unrecognized argument, and the options it could have meant (flags are never
    abbreviated: an abbreviation that argparse would have completed silently is refused here)."""
    flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=", 1)[0]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = [o for o in options if o.startswith(flag) or flag.startswith(o)] if flag.startswith("--") else []
    hint = f"; did you mean {' or '.join(close)}? (options are never abbreviated)" if close else ""
    parser.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normkit`` command."""
    parser, parsers = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(unknown, parsers.get(args.command) or parser)
    if args.command is None:
        parser.print_help()
        return 2
    handler = next(c.handler for c in COMMANDS if c.name == args.command)
    try:
        return handler(args, parsers[args.command])
    except BrokenPipeError:  # `normkit recipes | head`: the reader left, that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Failure as e:
        print(f"normkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingInterrupted carries where the checkpoint is and how to resume
        print(f"normkit {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
