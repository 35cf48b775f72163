"""The OpenCLIP text encoder against the SD reference, the ViT-H-14 key manifest, and its local-file loading."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointMismatchError, load_weights
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder, register_open_clip_config
from tests.reference import assert_close_to_reference, configs, sd21_shapes
from tests.reference import weights as reference_weights

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "open_clip" / "ViT-tiny-test.json"
TINY = "ViT-tiny-test"


assert_close = assert_close_to_reference


def tiny_embedder(**kwargs) -> FrozenOpenCLIPEmbedder:
    return FrozenOpenCLIPEmbedder(arch=TINY, arch_config=TINY_CONFIG, **kwargs)


@pytest.fixture(scope="module")
def meta() -> dict:
    return configs()


@pytest.fixture(scope="module")
def weights(reference) -> dict[str, torch.Tensor]:
    return reference_weights("cond_stage_model.")


@pytest.fixture(scope="module")
def embedder(weights) -> FrozenOpenCLIPEmbedder:
    model = tiny_embedder(layer="penultimate")
    load_weights(model, weights)
    return model


def test_shipped_config_is_the_reference_architecture(meta):
    assert json.loads(TINY_CONFIG.read_text()) == meta["open_clip_config"]


def test_tokenizer_matches_reference(reference, meta):
    assert torch.equal(open_clip.tokenize(meta["clip_texts"]), reference["clip_in.tokens"])


@torch.no_grad()
def test_penultimate_matches_reference(embedder, reference, meta):
    assert_close(embedder.encode_tokens(reference["clip_in.tokens"]), reference["clip_out.penultimate"])
    assert_close(embedder.encode(meta["clip_texts"]), reference["clip_out.penultimate"])
    assert_close(embedder(meta["clip_texts"]), reference["clip_out.penultimate"])


@torch.no_grad()
def test_last_layer_runs_every_block(embedder, weights, reference):
    last = tiny_embedder(layer="last")
    load_weights(last, weights)
    tokens = reference["clip_in.tokens"]
    out = last.encode_tokens(tokens)
    assert out.shape == (3, 77, 16)
    assert not torch.allclose(out, embedder.encode_tokens(tokens), atol=1e-3)


def test_frozen(embedder):
    assert not embedder.training and not embedder.model.training
    assert not any(p.requires_grad for p in embedder.parameters())
    assert any(p.requires_grad for p in tiny_embedder(freeze=False).parameters())


def test_vit_h_on_meta_matches_sd21_manifest():
    manifest = sd21_shapes()
    prefix = "cond_stage_model."
    expected = {k[len(prefix):]: tuple(v) for k, v in manifest.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="penultimate")
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.is_meta for v in state.values())


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "CLIP-ViT-H-14" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError) as info:
        FrozenOpenCLIPEmbedder(arch="ViT-H-14", version=str(path))
    assert str(path) in str(info.value) and "CLIP-ViT-H-14" in str(info.value)


def test_file_without_text_keys_is_rejected(weights, tmp_path):
    path = tmp_path / "partial.bin"
    torch.save({k: v for k, v in weights.items() if not k.startswith("model.ln_final.")}, path)
    with pytest.raises(CheckpointMismatchError, match="ln_final"):
        tiny_embedder(version=str(path))


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@torch.no_grad()
def test_weights_file_round_trip(reference, tmp_path, suffix):
    source = tiny_embedder(layer="penultimate")
    state = {k: v.clone() for k, v in source.model.state_dict().items()}
    state["visual.proj"] = torch.zeros(32, 16)  # image-tower keys of a full open_clip file are ignored
    path = tmp_path / f"open_clip_pytorch_model{suffix}"
    if suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = FrozenOpenCLIPEmbedder(arch=TINY, version=path, layer="penultimate")
    tokens = reference["clip_in.tokens"]
    assert torch.equal(loaded.encode_tokens(tokens), source.encode_tokens(tokens))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_invalid_layer_lists_valid_ones():
    with pytest.raises(ValueError, match="penultimate"):
        tiny_embedder(layer="pooled")


def test_registering_twice_is_harmless(tmp_path):
    register_open_clip_config(TINY, TINY_CONFIG)
    register_open_clip_config(TINY, TINY_CONFIG)
    assert open_clip.list_models().count(TINY) == 1
    assert open_clip.get_model_config(TINY) == json.loads(TINY_CONFIG.read_text())
    misnamed = tmp_path / "other-name.json"
    misnamed.write_text(TINY_CONFIG.read_text())
    with pytest.raises(ValueError, match="ViT-tiny-unregistered.json"):
        register_open_clip_config("ViT-tiny-unregistered", misnamed)
