import json
from pathlib import Path
from typing import Any

import pytest

from normkit.train.runner.config import ConfigError
from normkit.train.study.comparison import SUITES, Arm, Suite, compare, load_method_file, plan

TINY = {
    "data": "digits",
    "model": "mlp",
    "depth": 2,
    "width": 16,
    "norm": "bn",
    "epochs": 1,
    "batch_size": 128,
}


def tiny_suite() -> Suite:
    return Suite("tiny", "two methods, tiny budget", TINY, SUITES["default"].arms[:0], seeds=2)


def test_compare_end_to_end_writes_report_csv_and_pngs(tmp_path):
    from PIL import Image

    result = compare(tiny_suite(), tmp_path, methods=["bn-sgd", "brn-sgd"], html=True, log=lambda s: None)
    assert len(result.runs) == 4 and result.reused == 0
    report = (tmp_path / "report.md").read_text()
    assert "| bn-sgd | 2 |" in report and "vs bn-sgd" in report
    rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert rows[0].startswith("arm,method,baseline,seed") and len(rows) == 5
    for name in ["accuracy.png", "train_loss.png", "final_accuracy.png"]:
        path = tmp_path / name
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as img:
            img.load()
            assert img.width > 300 and img.height > 100
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    assert_valid_html(page)
    # Each run's accuracy in the CSV is the one its own metrics recorded.
    seed0 = json.loads(
        (tmp_path / "runs" / "bn-sgd" / "seed0" / "metrics.jsonl").read_text().splitlines()[-1]
    )
    assert rows[1].split(",")[5] == str(seed0["test_acc"])


def test_resume_reruns_nothing_finished(tmp_path):
    compare(tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=1, log=lambda s: None)
    run_dir = tmp_path / "runs" / "bn-sgd" / "seed0"
    stamp = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    result = compare(tiny_suite(), tmp_path, methods=["bn-sgd", "brn-sgd"], seeds=1, log=lambda s: None)
    assert result.reused == 1
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == stamp  # untouched: not recomputed
    assert (tmp_path / "runs" / "brn-sgd" / "seed0" / "summary.json").is_file()


def test_method_file_validation(tmp_path):
    good = tmp_path / "methods.json"
    good.write_text(
        json.dumps({"my-adam": {"description": "Adam, small lr", "overrides": {"optimizer": "adam"}}})
    )
    methods = load_method_file(good)
    assert methods["my-adam"].overrides == {"optimizer": "adam"}
    _, jobs = plan(tiny_suite(), methods=["bn-sgd", "my-adam"], extra_methods=methods, seeds=1, out=tmp_path)
    assert [j.config["optimizer"] for j in jobs] == ["sgd", "adam"]

    toml = tmp_path / "methods.toml"
    toml.write_text('[my-sgdg]\ndescription = "SGD-G, small lr_g"\noptimizer = "sgdg"\nlr_g = 0.1\n')
    assert load_method_file(toml)["my-sgdg"].overrides == {"optimizer": "sgdg", "lr_g": 0.1}

    cases = {
        "unknown options": {"m": {"optimiser": "adam"}},
        "invalid optimizer": {"m": {"optimizer": "lbfgs"}},
        "must be a table": {"m": 3},
    }
    for message, content in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=message):
            load_method_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_method_file(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_method_file(tmp_path / "missing.json")


def test_unknown_names_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        compare(tiny_suite(), tmp_path, methods=["bn-sgd", "nope"], log=lambda s: None)
    with pytest.raises(ConfigError, match="unknown suite"):
        compare("nope", tmp_path, log=lambda s: None)
    assert not (tmp_path / "runs").exists()


def test_every_suite_resolves_to_valid_configs(tmp_path):
    for name, suite in SUITES.items():
        _, jobs = plan(suite, out=tmp_path)
        assert len(jobs) == len(suite.arms) * suite.seeds, name


def test_cli_compare_list_and_run(tmp_path, capsys):
    from normkit.cli import main

    assert main(["compare", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "brn-sgd" in listing and "grassmann" in listing
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "bn-sgd,nsgd-l2", "--model", "mlp", "--seeds", "1", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert "| nsgd-l2 | 1 |" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--suite", "nope"])
    assert exc.value.code == 2


def test_cli_bench_runs_from_a_checkout_and_explains_elsewhere(tmp_path, monkeypatch, capfd):
    from pathlib import Path

    from normkit.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    # the runner (its own process) exits with its argparse error, which names the available benchmarks
    assert main(["bench", "nope"]) == 2 and "brn" in capfd.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick"])
    assert exc.value.code == 2 and "root of a normkit checkout" in capfd.readouterr().err


# --- trust: stale runs, changed settings, the lock, statistics in the report, valid HTML -----------------

VOID = {"meta", "img", "br", "hr", "link", "input"}
PARENTS = {"li": {"ul", "ol"}, "tr": {"thead", "tbody", "table"}, "td": {"tr"}, "th": {"tr"}}


def assert_valid_html(page: str) -> None:
    """Well-formed HTML: a doctype, every element closed in order, list items in lists, cells in rows."""
    from html.parser import HTMLParser

    class Checker(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.doctype = False

        def handle_decl(self, decl: str) -> None:
            self.doctype = decl.lower() == "doctype html"

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag in PARENTS:
                assert self.stack and self.stack[-1] in PARENTS[tag], f"<{tag}> inside {self.stack[-1:]}"
            if tag not in VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
            self.stack.pop()

    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.doctype and checker.stack == [], checker.stack


def test_html_checker_catches_what_the_old_report_did() -> None:
    with pytest.raises(AssertionError):
        assert_valid_html("<!doctype html><html><body><li>x</li></body></html>")  # a list item outside a list
    with pytest.raises(AssertionError):
        assert_valid_html("<!doctype html><html><body><p>x</body></html>")


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_changed_settings_on_an_existing_out_are_refused_in_one_line(tmp_path: Path) -> None:
    from normkit.train.runner import RunDirError

    compare(tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=1, log=lambda s: None)
    before = _mtimes(tmp_path)
    with pytest.raises(RunDirError) as err:
        compare(
            tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=1, overrides={"epochs": 2}, log=lambda s: None
        )
    message = str(err.value)
    assert "\n" not in message and "epochs 1 -> 2" in message and "--overwrite" in message
    assert _mtimes(tmp_path) == before  # nothing touched
    result = compare(
        tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=1, overrides={"epochs": 2}, overwrite=True,
        log=lambda s: None,
    )  # fmt: skip
    assert result.reused == 0 and len(result.runs[0]["metrics"]) == 2


def test_compare_lock(tmp_path: Path) -> None:
    import subprocess
    import sys

    from normkit.train.runner import RunDirError

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from normkit.train.study.comparison import _Lock\n"
         "with _Lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"another normkit compare \\(pid {holder.pid} "):
            compare(tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=1, log=lambda s: None)
        assert not (tmp_path / "runs").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file stays behind but holds nothing
    assert "pid" in (tmp_path / ".lock").read_text()
    result = compare(tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=1, log=lambda s: None)
    assert len(result.runs) == 1


def test_report_shows_what_ran_statistics_and_flags(tmp_path: Path) -> None:
    methods = tmp_path / "m.json"
    methods.write_text(json.dumps({"wild-sgd": {"description": "SGD at lr 1e4", "lr": 1e4, "norm": "none"}}))
    result = compare(
        tiny_suite(), tmp_path / "out", methods=["bn-sgd", "wild-sgd", "brn-sgd"], method_file=methods,
        overrides={"data": "mnist1d", "mnist1d_samples": 600, "epochs": 4}, seeds=1, html=True,
        log=lambda s: None,
    )  # fmt: skip
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- data: mnist1d (480 train / 120 test)" in report  # what ran, not the suite's base (digits)
    assert "epochs: 4" in report and "from " + str(methods) in report and "lr=10000.0" in report
    assert "Test set: 120 examples" in report and "sign-test" in report
    assert "1 seeds cannot reach 90 %" in report
    wild = next(r for r in result.runs if r["arm"] == "wild-sgd")
    assert wild["summary"]["diverged"] and wild["metrics"][-1]["diverged"]
    assert len(wild["metrics"]) < 4  # stopped at the first non-finite epoch
    assert "**diverged** (1/1 seeds)" in report
    assert_valid_html((tmp_path / "out" / "report.html").read_text())


def test_comparison_groups_and_loss_range() -> None:
    from normkit.train.study.report import arm_statistics, comparisons, loss_axis_range

    rows = [
        {"arm": a, "seed": 0, "final_test_acc": 0.5, "final_test_loss": 1.0, "final_train_loss": 1.0}
        for a in "abcdefghi"
    ]
    arms = tuple(
        Arm(label, label, {}, base)
        for label, base in zip("abcdefghi", [None, "a", "a", None, "d", None, "f", None, None])
    )
    groups = comparisons(arm_statistics(rows, arms))
    assert groups == [["a", "b", "c"], ["d", "e"], ["f", "g"], ["h"], ["i"]]
    curves = {"ok": [[1.0, 2.0], [0.5]], "bad": [[1e30], [float("nan")]]}
    assert loss_axis_range(curves, diverged={"bad"}) == (0.5, 2.0)


def test_compare_shows_one_bar_over_all_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    compare(tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=2, progress=True, log=lines.append)
    err = capsys.readouterr().err
    assert "compare: 100%" in err and "2/2" in err and "run" in err  # one tqdm bar (with its ETA) over runs
    assert not any(line.startswith("[1/2]") for line in lines)  # the bar replaces the per-run lines


def test_results_markdown_tables_are_generated_from_csv(tmp_path: Path) -> None:
    from normkit.cli import main
    from normkit.train.study.results import update_results_markdown

    root = tmp_path / "results"
    old = root / "grassmann"  # a built-in suite's older results.csv: no baseline / test_size columns
    old.mkdir(parents=True)
    lines = ["arm,method,seed,epochs,final_test_acc,final_test_loss,final_train_loss,mean_epoch_time_s"]
    for seed in range(5):
        lines += [
            f"sgd,sgd,{seed},15,{0.90 + 0.01 * seed},0.3,0.1,0.1",
            f"sgdg,sgdg,{seed},15,{0.92 + 0.01 * seed},0.3,0.1,0.1",
            f"adamg,adamg,{seed},15,{0.90 + 0.01 * seed - (0.01 if seed == 2 else 0)},0.3,nan,0.1",
        ]
    (old / "results.csv").write_text("\n".join(lines) + "\n")
    new = root / "mystudy"  # any new study with the current columns
    new.mkdir()
    rows = ["arm,method,baseline,seed,epochs,final_test_acc,final_test_loss,final_train_loss,"
            "mean_epoch_time_s,diverged,brn_warmup_only,data,model,train_size,test_size"]  # fmt: skip
    for seed in range(3):
        rows += [f"a,a,,{seed},2,0.5,1,1,0.1,False,False,digits,mlp,1437,360",
                 f"b,b,a,{seed},2,0.6,1,1,0.1,False,False,digits,mlp,1437,360"]  # fmt: skip
    (new / "results.csv").write_text("\n".join(rows) + "\n")
    md = tmp_path / "results.md"
    md.write_text(
        "# Results\n\nprose before\n\n<!-- normkit:results:grassmann:begin -->\nstale table\n"
        "<!-- normkit:results:grassmann:end -->\n\nprose after\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- normkit:results:verdicts:begin -->\n<!-- normkit:results:verdicts:end -->\n"
    )
    assert main(["report", str(root), "--markdown", str(md), "--also", str(readme)]) == 0
    text = md.read_text()
    assert "prose before" in text and "prose after" in text and "stale table" not in text
    assert "| sgdg | 5 | 94.00 [92.00–96.00] | +2.00 [+2.00, +2.00] vs sgd | better |" in text
    # adamg: one seed 1 point lower, four equal -> within noise; its NaN training loss flags divergence
    assert "| adamg | 5 |" in text and "within noise; **diverged** (5/5 seeds)" in text
    assert "Test set: 360 examples" in text  # the fixed digits split, for a CSV that did not record it
    assert "## mystudy (generated)" in text  # a new study folder gets a block appended
    assert (
        "| b | 3 | 60.00 [60.00–60.00] | +10.00 [+10.00, +10.00] vs a | within noise (3 seeds cannot" in text
    )
    assert "| mystudy | b vs a | 50.00 | 60.00 |" in readme.read_text()
    assert "## mystudy" not in readme.read_text()  # --also rewrites only the blocks a file has
    before = md.read_text()
    update_results_markdown(root, md)
    assert md.read_text() == before  # idempotent


def test_report_does_not_import_compare() -> None:
    """The compare -> report dependency goes one way only (no import circle, not even a lazy one)."""
    import ast

    import normkit.train.study.report as report
    import normkit.train.study.stats as stats
    import normkit.train.study.suite as suite

    for module in (report, stats, suite):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "normkit.train.study.comparison" not in imported, module.__name__


def test_a_killed_worker_is_reported_and_the_study_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normkit.train.study.comparison import WorkerDied

    monkeypatch.setenv("NORMKIT_CRASH_AT", "after-checkpoint:1")  # every worker SIGKILLs itself after epoch 1
    with pytest.raises(WorkerDied, match="run the same command again"):
        compare(tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=2, jobs=2, overrides={"epochs": 2},
                log=lambda s: None)  # fmt: skip
    monkeypatch.delenv("NORMKIT_CRASH_AT")
    lines: list[str] = []
    result = compare(
        tiny_suite(), tmp_path, methods=["bn-sgd"], seeds=2, overrides={"epochs": 2}, log=lines.append
    )
    assert "(0 already finished)" in lines[0]  # killed runs are not counted as finished
    assert all([m["epoch"] for m in r["metrics"]] == [1, 2] for r in result.runs)
    logs = [(tmp_path / "runs" / "bn-sgd" / f"seed{k}" / "log.txt").read_text() for k in range(2)]
    assert any("resumed from epoch 1" in log for log in logs)
