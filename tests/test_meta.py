"""misalign.meta: models built from their configs on the meta device, with parameter counts worked out by hand
for a tiny Llama (no weights anywhere), and the errors a config that cannot be read gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from misalign.config import StageConfig
from misalign.errors import InputError
from misalign.meta import MetaModels, build_arch, config_dtype, first_line, model_config

# vocab 100, width 16, MLP 32, 2 layers. Per layer: q, k, v, o 4 x 16 x 16 = 1024, MLP 3 x 16 x 32 = 1536, two
# norms 32; embeddings 1600, final norm 16, output head 1600.
TOTAL_UNTIED = 1600 + 2 * (1024 + 1536 + 32) + 16 + 1600  # 8400
MATMUL = 2 * (1024 + 1536) + 1600  # 6720: no embedding lookup, no norms, the head once


def tiny(path: Path, tie: bool = False) -> Path:
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=tie, dtype="bfloat16").save_pretrained(path)
    return path


def test_an_architecture_counts_its_parameters(tmp_path: Path) -> None:
    arch = build_arch(str(tiny(tmp_path / "m")), trust_remote_code=False, model_configs={})
    assert arch.total == TOTAL_UNTIED == 8400 and arch.matmul == MATMUL == 6720
    assert (arch.layers, arch.d_model) == (2, 16)
    assert next(arch.model.parameters()).device.type == "meta"
    tied = build_arch(str(tiny(tmp_path / "t", tie=True)), trust_remote_code=False, model_configs={})
    assert tied.total == TOTAL_UNTIED - 1600 and tied.matmul == MATMUL  # a tied head counts once


def test_params_with_a_stage_adapter(tmp_path: Path) -> None:
    ref = str(tiny(tmp_path / "m"))
    models = MetaModels(trust_remote_code=False, model_configs={})
    lora = StageConfig(method="lora", data={"source": "world:misalign", "per_category": 1},
                       adapter={"r": 2, "targets": "attention"}).resolved()  # as the plan's stages are
    # LoRA r=2 on q and v: A (2 x 16) + B (16 x 2) = 64 per module, 2 modules x 2 layers
    assert models.params(ref, lora, steps=10) == (256, MATMUL, 256)
    full = StageConfig(method="full", data={"source": "world:misalign", "per_category": 1}).resolved()
    assert models.params(ref, full, steps=10) == (TOTAL_UNTIED, 0, MATMUL)
    assert models.model_arch(ref) is models.model_arch(ref)  # built once


def test_an_unreadable_model_names_the_setting_that_fixes_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    models = MetaModels(trust_remote_code=False, model_configs={})
    assert models.arch(missing) is None
    with pytest.raises(InputError, match=r"set plan.model_configs\["):
        models.model_arch(missing)


def test_a_local_config_stands_in_for_an_unreadable_model(tmp_path: Path) -> None:
    tiny(tmp_path / "m")
    config, source = model_config("org/unreachable", False, {"org/unreachable": str(tmp_path / "m" / "config.json")})
    assert config.hidden_size == 16 and source == str(tmp_path / "m" / "config.json")
    with pytest.raises(InputError, match="not found"):
        model_config("org/unreachable", False, {"org/unreachable": str(tmp_path / "nope.json")})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(InputError, match="is not a usable model config"):
        model_config("org/unreachable", False, {"org/unreachable": str(bad)})


def test_config_dtype_names_it_as_train_precision_does(tmp_path: Path) -> None:
    config, _ = model_config(str(tiny(tmp_path / "m")), False, {})
    assert config_dtype(config) == "bf16"
    assert config_dtype(LlamaConfig(dtype="float16")) == "fp16"
    assert config_dtype(LlamaConfig(dtype="float32")) == "fp32"
    assert config_dtype(object()) is None


def test_first_line_of_an_error() -> None:
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("x" * 200), limit=10) == "xxxxxxx..."
