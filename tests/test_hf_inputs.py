"""Hugging Face inputs in task inference: a mapping ({"input_ids": ..., "attention_mask": ...} or a
BatchEncoding) is passed as keyword arguments, as Hugging Face models and PEFT take it."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import softtf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_two_tasks():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=4)
    model = softtf.wrap(transformers.BertForSequenceClassification(cfg).eval())
    for i, name in enumerate(["a", "b"]):
        model.add_task(name, init=("uniform", 0.5, 1.5), seed=i)
        model.freeze_task(name)
    ids = torch.randint(1, 100, (5, 12), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    att[:, 9:] = 0
    return model, {"input_ids": ids, "attention_mask": att}


def _by_hand(model, inputs, names):
    rows = []
    for b, name in enumerate(names):
        with softtf.use_task(name), torch.no_grad():
            rows.append(model(**{k: v[b:b + 1] for k, v in inputs.items()}).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("as_batch_encoding", [False, True])
def test_gradient_id_and_predict_take_a_mapping(bert_two_tasks, as_batch_encoding):
    model, inputs = bert_two_tasks
    if as_batch_encoding:
        inputs = transformers.BatchEncoding(inputs)
    res = softtf.gradient_id(model, inputs, rule="sample")
    assert res.scores.shape == (5, 2) and torch.isfinite(res.scores).all()
    # the same scores as through an explicit keyword forward_fn
    ref = softtf.gradient_id(model, dict(inputs), rule="sample", forward_fn=lambda inp: model(**inp).logits)
    torch.testing.assert_close(res.scores, ref.scores)
    for rule in ("batch", "binary", "binary-sample"):
        assert softtf.gradient_id(model, inputs, rule=rule, k_shot=3).task_index.shape == (5,)
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        logits = softtf.predict_with_tasks(model, inputs, index, res.tasks)
    torch.testing.assert_close(logits, _by_hand(model, dict(inputs), [res.tasks[i] for i in index.tolist()]),
                               rtol=1e-4, atol=1e-5)


def test_empty_mapping_is_refused(bert_two_tasks):
    model, _ = bert_two_tasks
    with pytest.raises(ValueError, match="inputs is empty"):
        softtf.gradient_id(model, {})
