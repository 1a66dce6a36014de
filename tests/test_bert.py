"""BertModel port vs HF transformers BertModel (tiny random config), eager and sharded under jit."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from xemogpt_jax import sharding
from xemogpt_jax.models.bert import BertConfig
from xemogpt_jax.models.bert_params import bert_key_map, load_bert


def _tiny_hf_bert(tmp_path, hidden_act: str) -> transformers.BertModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act=hidden_act,
        max_position_embeddings=24,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorm params are 1/0 at init; randomise so a swapped scale/bias would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def _padded_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_matches_transformers_on_padded_batch(tmp_path, hidden_act):
    hf = _tiny_hf_bert(tmp_path, hidden_act)
    batch = _padded_batch()
    with torch.no_grad():
        expected = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    model, report = load_bert(tmp_path)
    assert not report.missing
    hidden, pooled = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected.last_hidden_state.numpy()[valid], atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), expected.pooler_output.numpy(), atol=1e-4)


def test_sharded_jit_matches_transformers(tmp_path, devices):
    hf = _tiny_hf_bert(tmp_path, "gelu")
    batch = _padded_batch()
    with torch.no_grad():
        expected = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    mesh = sharding.make_mesh((1, 2, 4))
    model, _ = load_bert(tmp_path, mesh=mesh)
    kernel = model.layers[0].attention.q_proj.kernel
    assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids, mask, tt: nnx.merge(graphdef, st)(ids, mask, tt)[0])
    with jax.set_mesh(mesh):
        hidden = forward(state, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected[valid], atol=1e-4)


def test_key_map_accepts_task_head_prefix_and_legacy_norm_names():
    assert bert_key_map("bert.encoder.layer.3.output.LayerNorm.gamma").path == ("layers", 3, "output_norm", "scale")
    assert bert_key_map("embeddings.LayerNorm.beta").path == ("embeddings", "norm", "bias")
    assert bert_key_map("cls.predictions.bias") is None
    assert bert_key_map("embeddings.position_ids") is None


def test_refuses_non_bert_configs():
    with pytest.raises(ValueError, match="not a BERT encoder"):
        BertConfig.from_hf({"model_type": "mpnet", "hidden_size": 32})
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
