"""reproduce.py: recipes run over seeds, finished runs skipped, interrupted ones resumed, results files
with every field the README's table is rendered from, and a table rewrite that is idempotent."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import reproduce
from reproduce import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(max_iters=4, eval_interval=2, log_interval=1, controller_size=8, memory_size=8, memory_width=4,
            max_len=3, eval_lengths=(2, 4), eval_samples=8, batch_size=2, compile=False, figures=False)


RECIPE = Recipe("NTM copies (tiny)", "ntm", "copy", flags=dict(TINY), seeds=(0, 1), paper="few mistakes",
                metrics=("bit_err@2", "bit_err@4"), targets=(("bit_err@2", "<", 1000.0),))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny recipe run once (two seeds, side by side) for the tests that only read its results."""
    root = tmp_path_factory.mktemp("finished")
    saved = reproduce.RECIPES
    reproduce.RECIPES = {"tiny": RECIPE}
    try:
        reproduce.reproduce("tiny", jobs=2, out_root=str(root / "out"), results_dir=str(root / "results"))
    finally:
        reproduce.RECIPES = saved
    return root


@pytest.fixture
def tiny(monkeypatch, tmp_path, finished):
    """A copy of the finished runs and results in tmp_path, with the tiny recipe as the only one."""
    monkeypatch.setattr(reproduce, "RECIPES", {"tiny": RECIPE})
    shutil.copytree(finished / "out", tmp_path / "out")
    shutil.copytree(finished / "results", tmp_path / "results")
    return dict(out_root=str(tmp_path / "out"), results_dir=str(tmp_path / "results"))


def test_a_recipe_runs_every_seed_and_writes_the_results_file(tiny, tmp_path):
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    for key in ("recipe", "command", "runs", "mean", "stderr", "torch", "machine", "commit"):
        assert key in saved
    assert saved["recipe"]["name"] == "tiny" and saved["recipe"]["seeds"] == [0, 1]
    assert saved["command"].startswith("python train.py --model ntm --task copy --max_iters 4")
    assert "--seed 0" in saved["command"] and "--no-compile" in saved["command"]
    assert [r["seed"] for r in saved["runs"]] == [0, 1]
    metrics = [r["metrics"] for r in saved["runs"]]
    for r in saved["runs"]:  # each run's metrics are its metrics.json, as train.py wrote it
        on_disk = json.loads((tmp_path / "out" / "tiny" / f"s{r['seed']}" / "metrics.json").read_text())
        assert r["metrics"] == on_disk and r["wall_seconds"] > 0
    values = [m["bit_err@4"] for m in metrics]
    mean = sum(values) / 2
    assert saved["mean"]["bit_err@4"] == pytest.approx(mean, abs=1e-6)
    assert saved["stderr"]["bit_err@4"] == pytest.approx(abs(values[0] - values[1]) / 2, abs=1e-6)  # s / sqrt(2)
    assert saved["torch"] == torch.__version__ and saved["machine"]["threads_per_run"] == 1
    assert saved["machine"]["parallel_runs"] == 2 and saved["machine"]["cores"] == os.cpu_count()


@pytest.mark.slow  # 14 s of the default suite's two minutes; .ci/run runs it with -m slow
def test_a_finished_seed_is_not_run_again_and_an_interrupted_one_resumes(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out" / "tiny"
    shutil.rmtree(out / "s1")  # seed 0 finished; seed 1 is interrupted after 2 of its 4 steps: a checkpoint, no metrics
    subprocess.run([sys.executable, "train.py", *reproduce.runs_of("tiny", reproduce.RECIPES["tiny"], (1,),
                                                                       str(tmp_path / "out"), "")[0][3][:-2],
                    "--max_iters", "2", "--out_dir", str(out / "s1")],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.remove(out / "s1" / "metrics.json")
    assert torch.load(out / "s1" / "ckpt.pt", weights_only=True)["iter"] == 2
    reproduce.reproduce("tiny", **tiny)
    log = [json.loads(line) for line in (out / "s1" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4]  # continued at step 3, nothing repeated
    assert torch.load(out / "s1" / "ckpt.pt", weights_only=True)["iter"] == 4
    runs = {r["seed"]: r for r in json.loads((tmp_path / "results" / "tiny.json").read_text())["runs"]}
    assert runs[1]["resumed"] is True and "resumed" not in runs[0]  # the resumed run says so
    assert runs[1]["wall_seconds"] >= runs[1]["metrics"]["seconds"]  # the lost attempt's training time counts
    stamps = {s: os.path.getmtime(out / s / "metrics.json") for s in ("s0", "s1")}
    started = []
    real_run = subprocess.run

    def no_training(command, *args, **kwargs):  # git may still be asked for the commit
        if any("train.py" in str(part) for part in command):
            started.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(reproduce.subprocess, "run", no_training)
    reproduce.reproduce("tiny", **tiny)  # both finished: nothing runs, the results file is rewritten
    assert started == [] and stamps == {s: os.path.getmtime(out / s / "metrics.json") for s in ("s0", "s1")}


def test_a_run_folder_made_with_other_settings_is_refused_not_reused(tiny, tmp_path, monkeypatch):
    argv = json.loads((tmp_path / "out" / "tiny" / "s0" / "argv.json").read_text())
    assert argv[:4] == ["--model", "ntm", "--task", "copy"] and "--seed" in argv  # what the run was made with
    changed = Recipe(**{**reproduce.asdict(RECIPE), "flags": {**TINY, "max_iters": 6}})
    monkeypatch.setattr(reproduce, "RECIPES", {"tiny": changed})
    before = (tmp_path / "results" / "tiny.json").read_text()
    with pytest.raises(reproduce.HarnessError, match="was run with other settings.*move it away or delete it"):
        reproduce.reproduce("tiny", **tiny)
    assert (tmp_path / "results" / "tiny.json").read_text() == before  # nothing rewritten


@pytest.mark.slow  # 7 s of the default suite's two minutes; .ci/run runs it with -m slow
def test_a_grid_recipe_runs_each_point_with_each_seed(monkeypatch, tmp_path):
    shared = dict(max_iters=2, eval_interval=2, max_len=3, eval_lengths=(2, 4), eval_samples=8, batch_size=2,
                  compile=False, figures=False)
    recipe = Recipe("grid", "ntm", "copy", flags=shared, seeds=(0,),
                    points={"small": dict(controller_size=8, memory_size=6, memory_width=4),
                            "lstm": dict(model="lstm", hidden_size=4)},
                    metrics=("bit_err@2",), targets=(("bit_err@2", "<", 0.0),), target_points=("small",),
                    figure=("bit_err@2", "bit_err@4"))
    monkeypatch.setattr(reproduce, "RECIPES", {"grid": recipe})
    result = reproduce.reproduce("grid", jobs=2, out_root=str(tmp_path / "out"), results_dir=str(tmp_path / "r"))
    assert [(r["point"], r["seed"]) for r in result["runs"]] == [("small", 0), ("lstm", 0)]
    assert set(result["mean"]) == {"small", "lstm"}
    ckpt = torch.load(tmp_path / "out" / "grid" / "lstm" / "s0" / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "lstm"
    assert reproduce.verdict(result["recipe"], result) == "no"  # the target binds the 'small' point only
    png = (tmp_path / "r" / "grid.png").read_bytes()  # the bars of each figure metric per point (ACT Fig. 4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a point added to the recipe after the run: its row is stale and shows the points that were run
    recipe.points["later"] = dict(controller_size=4)
    line = next(line for line in reproduce.table(str(tmp_path / "r")).splitlines() if "`grid`" in line)
    assert "small: bit_err@2" in line and "later:" not in line and "stale" in line


def fake_training(metrics_of):
    """A run_one that trains nothing: it writes the metrics.json metrics_of(run_dir) gives, and logs the folder."""
    started = []

    def run_one(run_dir, argv, threads):
        started.append(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(metrics_of(run_dir), f)

    return run_one, started


def test_runs_the_results_file_holds_are_kept_when_their_folders_are_gone(tiny, tmp_path, monkeypatch):
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    shutil.rmtree(tmp_path / "out")  # a fresh checkout: results/ is there, out/ is not
    run_one, started = fake_training(lambda run_dir: {"bit_err@2": 0.5, "bit_err@4": 7.0, "iter": 4})
    monkeypatch.setattr(reproduce, "run_one", run_one)
    result = reproduce.reproduce("tiny", **tiny)
    assert started == [] and result["runs"] == saved["runs"] and result["recipe"]["seeds"] == [0, 1]
    result = reproduce.reproduce("tiny", seeds=[2], **tiny)  # another seed is added beside the recorded ones
    assert [os.path.basename(d) for d in started] == ["s2"]
    assert [r["seed"] for r in result["runs"]] == [0, 1, 2] and result["runs"][:2] == saved["runs"]
    assert result["recipe"]["seeds"] == [0, 1, 2] and "(3 seeds)" in reproduce.row("tiny", result)
    values = [r["metrics"]["bit_err@4"] for r in result["runs"]]
    assert result["mean"]["bit_err@4"] == pytest.approx(sum(values) / 3, abs=1e-6)
    # runs recorded with other training settings are not kept: they would be stale
    changed = Recipe(**{**reproduce.asdict(RECIPE), "flags": {**TINY, "max_iters": 6}})
    monkeypatch.setattr(reproduce, "RECIPES", {"tiny": changed})
    assert reproduce.recorded("tiny", tiny["results_dir"]) == {}
    (tmp_path / "results" / "tiny.json").write_text("{not json")
    with pytest.raises(reproduce.HarnessError, match="is not a results file.*git checkout, or delete it"):
        reproduce.reproduce("tiny", **tiny)


def test_points_of_a_grid_can_be_run_one_at_a_time(monkeypatch, tmp_path):
    recipe = Recipe("grid", "ntm", "copy", flags=dict(TINY), seeds=(0, 1), metrics=("bit_err@2",),
                    points={"a": dict(memory_size=6), "b": dict(memory_size=10)}, targets=(("bit_err@2", "<", 1.0),))
    monkeypatch.setattr(reproduce, "RECIPES", {"grid": recipe})
    run_one, started = fake_training(lambda run_dir: {"bit_err@2": 0.5 if "/b/" in run_dir else 2.0, "iter": 4})
    monkeypatch.setattr(reproduce, "run_one", run_one)
    where = dict(out_root=str(tmp_path / "out"), results_dir=str(tmp_path / "r"))
    result = reproduce.reproduce("grid", seeds=[0], points=["b"], **where)
    assert [(r["point"], r["seed"]) for r in result["runs"]] == [("b", 0)] and set(result["mean"]) == {"b"}
    # not all seeds nor all points yet: the verdict says how much of the grid it covers
    assert "b: bit_err@2 0.5 (1 seed) | yes (1 of 2 seeds) (1 of 2 points) |" in reproduce.row("grid", result)
    result = reproduce.reproduce("grid", points=["a"], **where)  # the recipe's seeds: 0 and 1 of point a
    assert [(r["point"], r["seed"]) for r in result["runs"]] == [("a", 0), ("a", 1), ("b", 0)]
    assert len(started) == 3 and set(result["mean"]) == {"a", "b"}
    row = reproduce.row("grid", result)
    assert "a: bit_err@2 2 ± 0" in row and "b: bit_err@2 0.5 (1 seed)" in row and "| partly |" in row
    with pytest.raises(reproduce.HarnessError, match="grid has no point c: its points are a, b"):
        reproduce.reproduce("grid", points=["c"], **where)


def test_model_by_task_grids_read_as_one_entry_per_model():
    recipe = {"points": {"ut/qa1": {}, "ut/qa2": {}, "lstm/qa1": {}}, "metrics": ["err"], "seeds": [0]}
    result = {"recipe": {"seeds": [0]}, "runs": [{"point": p, "seed": 0} for p in recipe["points"]],
              "mean": {"ut/qa1": {"err": 0.0}, "ut/qa2": {"err": 45.25}, "lstm/qa1": {"err": 3.0}}, "stderr": {}}
    assert reproduce.ours(recipe, result) == "ut: err qa1 0, qa2 45.2; lstm: err qa1 3 (1 seed each)"


def test_verdicts_follow_the_targets_over_every_seed():
    recipe = {"targets": [["acc", ">", 90]], "points": None}
    runs = lambda *accs: {"runs": [{"metrics": {"acc": a}} for a in accs]}
    assert reproduce.verdict(recipe, runs(95, 99)) == "yes"
    assert reproduce.verdict(recipe, runs(95, 50)) == "partly"  # one seed of two meets every target
    two = {"targets": [["acc", ">", 90], ["err", "<", 1]], "points": None}
    assert reproduce.verdict(two, {"runs": [{"metrics": {"acc": 95, "err": 5}}]}) == "no"  # one target of two
    assert reproduce.verdict(recipe, runs(10, 50)) == "no"
    assert reproduce.verdict({"targets": [], "points": None}, runs(10)) == "baseline"


def test_the_table_is_rendered_from_results_files_and_rewriting_it_changes_nothing(tiny, tmp_path):
    readme, docs = tmp_path / "README.md", tmp_path / "docs"
    readme.write_text("# x\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\nafter\n")
    docs.mkdir()
    (docs / "ntm.md").write_text("runs:\n<!-- runs:tiny -->\n<!-- /runs:tiny -->\n")
    reproduce.write_tables(str(readme), tiny["results_dir"], str(docs))
    first, page = readme.read_text(), (docs / "ntm.md").read_text()
    assert "old" not in first and first.endswith("<!-- results:end -->\n\nafter\n")
    result = json.loads((tmp_path / "results" / "tiny.json").read_text())
    row = next(line for line in first.splitlines() if "`tiny`" in line)
    assert reproduce.fmt(result["mean"]["bit_err@2"]) in row and "| yes |" in row and "(2 seeds)" in row
    assert "| 0 |" in page and "| 1 |" in page and result["command"] in page  # per-seed rows and the command
    reproduce.write_tables(str(readme), tiny["results_dir"], str(docs))
    assert readme.read_text() == first and (docs / "ntm.md").read_text() == page
    reproduce.RECIPES["tiny"] = Recipe(**{**reproduce.asdict(RECIPE), "flags": dict(TINY, max_iters=5)})
    assert "stale" in next(line for line in reproduce.table(tiny["results_dir"]).splitlines() if "`tiny`" in line)
    assert "**Stale:**" not in page
    reproduce.write_tables(str(readme), tiny["results_dir"], str(docs))
    assert (docs / "ntm.md").read_text().count("**Stale:**") == 1  # the per-seed block says so too


def test_a_recipe_without_results_gets_a_row_that_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RECIPES", {"later": Recipe("later claim", "ntm", "copy")})
    assert "| later claim |  | not yet run by the harness |" in reproduce.table(str(tmp_path))


def test_every_shipped_recipe_names_a_model_task_and_flags_train_py_accepts():
    import train
    for name, recipe in reproduce.RECIPES.items():
        for point, seed, run_dir, argv in reproduce.runs_of(name, recipe, recipe.seeds, "out", "data"):
            model_name, task_name, flags = train.parse_args(argv)  # raises UserError on an unknown flag
            assert task_name == recipe.task and model_name in train.MODELS
        assert recipe.metrics and recipe.claim and (recipe.targets or "baseline" in recipe.note)
        assert len(recipe.seeds) == 3 or recipe.note, f"{name}: fewer than 3 seeds needs a reason"


def test_a_flag_can_name_another_recipes_run_of_the_same_seed():
    runs = reproduce.runs_of("ni_transfer", reproduce.RECIPES["ni_transfer"], (1,), "out/x", "")
    assert len(runs) == len(reproduce.RECIPES["ni_transfer"].points) >= 3  # one per point
    for point, seed, run_dir, argv in runs:
        assert argv[argv.index("--init_from") + 1] == "out/x/ni_digits/s1/ckpt.pt"
        assert run_dir.startswith("out/x/ni_transfer/") and run_dir.endswith("/s1")


def test_bad_requests_are_one_line_errors(capsys):
    for argv, message in ((["nope"], "unknown recipe nope"), (["ntm_copy", "--seeds", "a"], "--seeds takes"),
                          ([], "name a recipe"), (["ntm_copy", "lstm_copy", "--points", "a"], "name exactly one"),
                          (["ntm_copy", "--points", "a"], "ntm_copy has no point a")):
        with pytest.raises(SystemExit) as exit_info:
            reproduce.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_list_prints_every_recipe_with_its_claim(capsys):
    reproduce.main(["--list"])
    out = capsys.readouterr().out
    for name, recipe in reproduce.RECIPES.items():
        assert name in out and recipe.claim in out


def test_the_recorded_command_names_the_data_root_by_a_placeholder(monkeypatch, tmp_path):
    recipe = Recipe("data", "ntm", "copy", flags=dict(TINY), seeds=(0,), metrics=("bit_err@2",), data="mnist",
                    note="baseline")
    monkeypatch.setattr(reproduce, "RECIPES", {"data": recipe})
    monkeypatch.setattr(reproduce, "run_one", lambda *args: None)  # nothing to train: only the record is checked
    run_dir = tmp_path / "out" / "data" / "s0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"bit_err@2": 1.0, "iter": 4}))
    result = reproduce.reproduce("data", out_root=str(tmp_path / "out"), results_dir=str(tmp_path / "r"),
                                 data_root=str(tmp_path / "my datasets"))
    assert "--data_dir DATA_ROOT/mnist" in result["command"] and "my datasets" not in result["command"]
