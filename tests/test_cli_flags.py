"""The command line as a user meets it: no abbreviated options, a portable default --out, `bench --help`
listing the benchmarks, `compare` printing its table and a verdict the statistics computed, a custom study
described as itself, and test skips that name no machine path."""

import ast
import json
import sys
from pathlib import Path

import pytest
from normkit.train.suite import CompareResult

from normkit.cli import build_parser, main
from normkit.train.study import METHODS, SUITES, plan
from normkit.train.study.report import study_description
from tests.conftest import mnist_skip_reason
from tests.test_byo import DATA, MODEL

ROOT = Path(__file__).resolve().parents[1]


def test_every_parser_refuses_abbreviations() -> None:
    parser, parsers = build_parser()
    assert parser.allow_abbrev is False
    assert parsers and all(p.allow_abbrev is False for p in parsers.values())


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["compare", "--seed", "3"], "--seeds"),  # would have run the whole default suite
        (["train", "--epoch", "3"], "--epochs"),  # would have been read as --epochs
        (["train", "--epoch=3"], "--epochs"),
        (["report", "docs/results", "--mark", "x.md"], "--markdown"),
    ],
)
def test_an_abbreviated_option_is_refused_naming_the_option(
    argv: list[str],
    meant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"normkit {argv[0]}: error: unrecognized argument" in err and f"did you mean {meant}?" in err
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_train_default_out_is_a_portable_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nk_model.py").write_text(MODEL)
    (tmp_path / "nk_data.py").write_text(DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    try:
        assert main(["train", "--model", "nk_model:net", "--data", "nk_data:blobs", "--epochs", "1"]) == 0
    finally:
        for name in [m for m in sys.modules if m.startswith("nk_")]:
            del sys.modules[name]
    made = [p.name for p in (tmp_path / "runs").iterdir()]
    assert made == [
        "nk_data_blobs-nk_model_net-sgd-seed0"
    ]  # no ':' (refused on Windows, split by PATH tools)
    assert (tmp_path / "runs" / made[0] / "summary.json").is_file()


def test_bench_help_lists_every_benchmark(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        title = next(
            ast.literal_eval(node.value)
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TITLE"
        )
        name = path.stem.removeprefix("bench_")
        assert any(line.split()[:1] == [name] and title in line for line in out.splitlines()), name


def test_the_demo_suite_can_call_a_real_effect() -> None:
    """`make demo` runs the default suite: enough seeds for the sign test to reach 90 %, and the LSUV
    comparison whose effect is large (the default init does not train 10 plain layers)."""
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "normkit compare" in demo and "--suite" not in demo and "--seeds" not in demo
    default = SUITES["default"]
    assert default.seeds >= 5
    assert any(a.method == "lsuv-plain" and a.baseline == "plain-default" for a in default.arms)


def test_compare_prints_a_computed_better_verdict_and_describes_a_custom_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's LSUV comparison, shortened (2 epochs) and given as a user's method file: 5 seeds, the
    verdict computed by the sign test, the table printed on the terminal, the report describing this study."""
    deep = {"depth": 10, "epochs": 2}
    methods = {
        "deep-default": {"description": "10 plain layers", **METHODS["plain-default"].overrides, **deep},
        "deep-lsuv": {"description": "10 plain layers, LSUV", **METHODS["lsuv-plain"].overrides, **deep},
    }
    (tmp_path / "m.json").write_text(json.dumps(methods))
    argv = ["compare", "--method-file", str(tmp_path / "m.json"), "--methods", "deep-default,deep-lsuv"]
    assert main([*argv, "--seeds", "5", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| deep-lsuv | 5 |")]
    assert len(table) == 1 and "vs deep-default | better |" in table[0]
    assert "False-positive rate" in out and "6.25 % with 5 seeds" in out
    report = (tmp_path / "s" / "report.md").read_text()
    assert SUITES["default"].description not in report and "A short tour" not in report
    assert "A custom study: 2 arms (`deep-default`, `deep-lsuv`) on digits with model mlp" in report
    assert f"methods from {tmp_path / 'm.json'}" in report


def test_a_study_on_other_data_does_not_borrow_the_suites_blurb() -> None:
    suite, jobs = plan(SUITES["default"], overrides={"data": "mnist1d"}, seeds=1)
    assert suite.description == "" and suite.arms == SUITES["default"].arms  # same arms, not the same study
    runs = [{"arm": j.arm, "seed": j.seed, "config": j.config} for j in jobs]
    text = study_description(CompareResult(suite, runs, Path("."), 0))
    assert "on mnist1d with model mlp" in text and "digits" not in text
    same, _ = plan(SUITES["default"], overrides={"data": "digits", "epochs": 2}, seeds=1)
    assert same.description == SUITES["default"].description  # the suite as written: its own blurb


def test_mnist_skip_message_names_no_machine_path(tmp_path: Path) -> None:
    default = mnist_skip_reason(tmp_path / "absent", from_env=False)
    assert default is not None and str(tmp_path) not in default and "NORMKIT_MNIST_DIR" in default
    given = mnist_skip_reason(tmp_path / "absent", from_env=True)
    assert given is not None and str(tmp_path / "absent") in given  # the user's own folder, named back
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert mnist_skip_reason(tmp_path, from_env=False) is None


def test_readme_documents_every_argument_of_compare_methods() -> None:
    import inspect

    from normkit.train import compare_methods

    readme = (ROOT / "README.md").read_text()
    section = readme.split("`compare_methods(...)` is `normkit compare`", 1)[1].split("\n## ", 1)[0]
    for name, param in inspect.signature(compare_methods).parameters.items():
        shown = f"`**{name}`" if param.kind is inspect.Parameter.VAR_KEYWORD else f"`{name}`"
        assert shown in section, name
