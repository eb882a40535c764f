"""TRL's ModelConfig options reach the models qalign loads (they used to parse and then do nothing)."""

from __future__ import annotations

from qalign.train import load_policy
from qalign.train_config import parse_config


def _loaded(tiny_model_dir, tmp_path, *extra):
    return parse_config(["--config", "configs/demo.yaml", "--model_name_or_path", str(tiny_model_dir),
                         "--output_dir", str(tmp_path), *extra])  # fmt: skip


def test_attn_implementation_reaches_the_policy(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    model, _ = load_policy(_loaded(tiny_model_dir, tmp_path))
    assert model.config._attn_implementation == "sdpa"  # transformers' default on this machine
    model, _ = load_policy(_loaded(tiny_model_dir, tmp_path, "--attn_implementation", "eager"))
    assert model.config._attn_implementation == "eager"


def test_model_revision_is_passed_on_to_the_reference(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    loaded = _loaded(tiny_model_dir, tmp_path, "--model_revision", "v1", "--trust_remote_code")
    load_policy(loaded)  # a local folder has no revisions: transformers reads the folder as it is
    # TRL builds π_ref from the policy's id with training.model_init_kwargs: the same revision.
    assert loaded.training.model_init_kwargs == {"revision": "v1"}


def test_model_options_become_from_pretrained_arguments():
    from types import SimpleNamespace

    from qalign.models import model_init_kwargs, tokenizer_kwargs

    plain = SimpleNamespace(model_revision="main", trust_remote_code=False, attn_implementation=None,
                            load_in_4bit=False, load_in_8bit=False)  # fmt: skip
    assert model_init_kwargs(plain) == {}
    chosen = SimpleNamespace(**{**vars(plain), "model_revision": "abc123", "trust_remote_code": True,
                                "attn_implementation": "eager"})  # fmt: skip
    assert model_init_kwargs(chosen) == {
        "revision": "abc123",
        "trust_remote_code": True,
        "attn_implementation": "eager",
    }
    assert tokenizer_kwargs(chosen) == {"revision": "abc123", "trust_remote_code": True}


def test_q_sharp_value_model_is_cut_with_the_same_options(tiny_model_dir):
    from qalign.value_model import QSharpValueModel, ValueHeadConfig

    value = QSharpValueModel.from_reference(str(tiny_model_dir), ValueHeadConfig(num_layers=1), "float32",
                                            attn_implementation="eager")  # fmt: skip
    assert value.trunk.config._attn_implementation == "eager"


def test_collection_takes_the_same_model_options(tiny_model_dir, tmp_path):
    from qalign.data.collection import CollectArguments
    from qalign.models import model_init_kwargs

    args = CollectArguments(model_name_or_path=str(tiny_model_dir), attn_implementation="eager", model_revision="v2")
    assert model_init_kwargs(args) == {"revision": "v2", "attn_implementation": "eager"}
    # A dataset collected before these keys existed resumes: at their defaults they are not part of its identity.
    assert "attn_implementation" in args.content_key()
    assert "attn_implementation" not in CollectArguments(model_name_or_path=str(tiny_model_dir)).content_key()
