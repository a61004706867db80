"""c_null stored beside the shards: written by `anyflow-ray data`, returned by load_uncond when it matches the
config, encoded again (with the reason logged) when it does not."""

from __future__ import annotations

import logging

import pytest
import torch

from anyflow_ray.data import uncond
from anyflow_ray.data.uncond import UNCOND_NAME, encoder_fingerprint, load_uncond, read_uncond, write_uncond
from anyflow_ray.models.loading import load_text_encoder, text_max_length
from anyflow_ray.models.text import encode_prompts
from anyflow_ray.run.config import load_config


def encoded(base, prompt):
    tokenizer, encoder = load_text_encoder(base)
    return encode_prompts(tokenizer, encoder, [prompt], text_max_length(base))


@pytest.fixture
def cfg(tmp_path, tiny_model_dir):
    def make(*overrides):
        return load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"model.base={tiny_model_dir}",
                                                 "data.num_train=8", "data.num_heldout=4", "data.shard_size=4",
                                                 "run.threads=1", *overrides])
    return make


def test_the_data_job_writes_c_null_and_load_uncond_returns_it_without_a_text_encoder(cfg, tiny_model_dir,
                                                                                      monkeypatch):
    from anyflow_ray.jobs import data

    config = cfg("model.negative_prompt=a blue circle moving left")
    data.run(config)
    stored, meta = read_uncond(config.data.root)
    expected = encoded(tiny_model_dir, "a blue circle moving left")
    assert torch.equal(stored, expected) and stored.shape == (1, text_max_length(tiny_model_dir), expected.shape[2])
    assert meta == {"prompt": "a blue circle moving left", "max_length": str(text_max_length(tiny_model_dir)),
                    "text_encoder": encoder_fingerprint(tiny_model_dir)}

    def no_encoder(*args):
        raise AssertionError("the text encoder was loaded although c_null is stored")

    monkeypatch.setattr(uncond, "encode_uncond", no_encoder)
    assert torch.equal(load_uncond(config), expected)


@pytest.mark.parametrize("change,reason", [
    ("prompt", "not model.negative_prompt"),
    ("max_length", "text max length is 3"),
    ("encoder", "another text encoder"),
    ("absent", f"no {UNCOND_NAME}"),
])
def test_a_stored_c_null_that_does_not_match_is_encoded_again(cfg, tiny_model_dir, tmp_path, caplog, change, reason):
    config = cfg("model.negative_prompt=red square")
    max_length, fingerprint = text_max_length(tiny_model_dir), encoder_fingerprint(tiny_model_dir)
    stale = torch.full_like(encoded(tiny_model_dir, "red square"), 7.0)
    if change != "absent":
        write_uncond(config.data.root, stale if change != "max_length" else stale[:, :3],
                     "something else" if change == "prompt" else "red square",
                     3 if change == "max_length" else max_length,
                     "0123456789abcdef" if change == "encoder" else fingerprint)
    with caplog.at_level(logging.INFO, logger="anyflow_ray"):
        got = load_uncond(config)
    assert torch.equal(got, encoded(tiny_model_dir, "red square"))
    assert reason in caplog.text


def test_a_c_null_of_the_wrong_shape_or_a_broken_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"c_null must be \(1, 4, D\)"):
        write_uncond(tmp_path, torch.zeros(2, 4, 8), "p", 4, "")
    (tmp_path / UNCOND_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{UNCOND_NAME}: not a c_null file"):
        read_uncond(tmp_path)
