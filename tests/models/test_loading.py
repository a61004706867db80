import json
import subprocess
import sys

import torch

from anyflow_ray.models.loading import load_text_encoder, load_transformer, text_max_length
from anyflow_ray.models.text import encode_prompts


def test_make_tiny_writes_a_diffusers_layout(tiny_model_dir):
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model_dir / sub).is_dir(), sub
    assert (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tiny_model_dir / "transformer" / "config.json").read_text())["_class_name"] == \
        "WanTransformer3DModel"
    assert json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())["shift"] == 5.0


def test_prompt_encoding_distinguishes_prompts_and_zeroes_padding(tiny_model_dir):
    tokenizer, encoder = load_text_encoder(tiny_model_dir)
    L = text_max_length(tiny_model_dir)
    emb = encode_prompts(tokenizer, encoder, ["a red circle moving left", "a blue circle moving left", ""], L)
    assert emb.shape == (3, L, encoder.config.d_model)
    assert not torch.allclose(emb[0], emb[1])
    n_tokens = len(tokenizer("a red circle moving left").input_ids)
    assert torch.all(emb[0, n_tokens:] == 0) and torch.any(emb[0, :n_tokens] != 0)
    # deterministic
    assert torch.equal(emb, encode_prompts(tokenizer, encoder, ["a red circle moving left", "a blue circle moving left", ""], L))


def test_cli_make_tiny_then_loader_reads_it(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "anyflow_ray.cli", "make-tiny", str(out), "--config",
                           "configs/tiny.yaml", "model.tiny.num_layers=1", f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model = load_transformer(out)
    assert model.config.num_layers == 1 and model.config.in_channels == 3
