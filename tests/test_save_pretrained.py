"""PEFT-style persistence of a wrapped Hugging Face model: SoftModel.save_pretrained / from_pretrained,
and no pass-through to the wrapped model's own persistence."""
import json

import pytest
import torch

import softtf
from softtf import SoftModel

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_save_pretrained_round_trip(tmp_path):
    model = softtf.wrap(_bert())
    model.add_task("a", init=("uniform", 0.8, 1.2), seed=0)
    with torch.no_grad():
        model.model.classifier.weight.add_(0.5)  # a trained head
    model.freeze_task("a")
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad(), softtf.use_task("a"):
        before = model(input_ids=ids).logits
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["masks.safetensors", "softtf_config.json"]
    info = json.loads((out / "softtf_config.json").read_text())
    assert info["tasks"] == ["a"] and info["frozen"] == ["a"] and info["modules_to_save"] == ["classifier"]
    again = SoftModel.from_pretrained(_bert(), out)
    with torch.no_grad(), softtf.use_task("a"):
        assert torch.equal(again(input_ids=ids).logits, before)


def test_from_pretrained_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="masks.safetensors.*save_pretrained"):
        SoftModel.from_pretrained(_bert(), tmp_path / "nothing")


def test_library_persistence_is_not_passed_through(tmp_path):
    model = softtf.wrap(_bert())
    model.add_task("a")
    with pytest.raises(AttributeError, match="push_to_hub is not supported.*save_pretrained"):
        model.push_to_hub("x")
    assert model.save_pretrained.__func__ is SoftModel.save_pretrained  # ours, not Hugging Face's
    assert model.config is model.model.config  # other attributes still reach the wrapped model
