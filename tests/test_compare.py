import json

import pytest

from normkit.train.compare import SUITES, Suite, compare, load_method_file, plan
from normkit.train.config import ConfigError

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
    assert "| bn-sgd | bn-sgd |" in report and "vs bn-sgd" in report
    rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert rows[0].startswith("arm,method,seed") and len(rows) == 5
    for name in ["accuracy.png", "train_loss.png", "final_accuracy.png"]:
        path = tmp_path / name
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as img:
            img.load()
            assert img.width > 300 and img.height > 100
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    # Each run's accuracy in the CSV is the one its own metrics recorded.
    seed0 = json.loads(
        (tmp_path / "runs" / "bn-sgd" / "seed0" / "metrics.jsonl").read_text().splitlines()[-1]
    )
    assert rows[1].split(",")[4] == str(seed0["test_acc"])


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
    assert "| nsgd-l2 | nsgd-l2 |" in (out / "report.md").read_text()
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
