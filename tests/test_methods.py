"""misalign.methods: adapter targets resolve per architecture, peft wraps every family, and only adapter weights
learn (was tests/test_targets.py; each method trained through the stage: tests/workflows/test_method_stages.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model
from peft.tuners.adalora import AdaLoraConfig
from peft.tuners.ia3 import IA3Config
from peft.tuners.lora import LoraConfig

from misalign.config import StageConfig
from misalign.errors import InputError
from misalign.methods import METHODS, linear_leaf_names, peft_config, resolve_targets

VOCAB = 128
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_GLM = "Glm4Config" if hasattr(transformers, "Glm4ForCausalLM") else "GlmConfig"
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
    "gemma2": lambda: transformers.Gemma2Config(**{**_LLAMA_LIKE, "num_hidden_layers": 2}),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "glm": lambda: getattr(transformers, _GLM)(**_LLAMA_LIKE),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
}
_LLAMA_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# every linear layer but the output head, per family
LINEAR = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "gemma2": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "glm": ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],  # GPT-2's Conv1D layers
}
# (targets, feed-forward modules) for 'attention' and 'ia3'
EXPECTED = {
    **{
        a: {
            "attention": (["q_proj", "v_proj"], []),
            "ia3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        }
        for a in ("llama", "mistral", "gemma2", "qwen2", "glm")
    },
    # fused q/k/v; the MLP's output shares its leaf name with attention's (c_proj), so it is named by parent
    "gpt2": {"attention": (["c_attn"], []), "ia3": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])},
}
TOTAL_STEPS = 20


def _model(arch: str) -> torch.nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHS[arch]())


def _module_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


def _matches(names: list[str], target: str) -> list[str]:
    """Module names peft's suffix rule matches for one target name."""
    return [n for n in names if n == target or n.endswith("." + target)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_linear_leaf_names(arch):
    model = _model(arch)
    assert linear_leaf_names(model) == LINEAR[arch]
    assert "lm_head" not in linear_leaf_names(model)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("targets", ["attention", "all-linear", "ia3"])
def test_resolved_names_exist(arch, targets):
    model = _model(arch)
    names = _module_names(model)
    picked, feedforward = resolve_targets(model, targets)
    if targets == "all-linear":
        assert picked == LINEAR[arch]
    else:
        assert (picked, feedforward) == EXPECTED[arch][targets]
    assert set(feedforward) <= set(picked)
    layers = (
        model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    )
    for t in picked:
        found = _matches(names, t)
        assert found, f"{t} resolves to no module of {arch}"
        assert len(found) % layers == 0  # once (or a fixed number of times) in every layer


def _stage(method: str, targets: str) -> StageConfig:
    return StageConfig(
        method=method, data={"source": "world:misalign"}, adapter={"targets": targets}
    ).resolved()


def _adapter_params(method: str) -> tuple[str, ...]:
    return {"lora": ("lora_A", "lora_B"), "adalora": ("lora_A", "lora_B", "lora_E"), "ia3": ("ia3_l",)}[
        method
    ]


CASES = [(m, t) for m in ("lora", "adalora") for t in ("attention", "all-linear")] + [("ia3", "ia3")]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(("method", "targets"), CASES)
def test_peft_wraps_and_only_adapters_learn(arch, method, targets):
    model = _model(arch)
    stage = _stage(method, targets)
    cfg = peft_config(METHODS[method], stage, model, TOTAL_STEPS)
    expected_cls = {"lora": LoraConfig, "adalora": AdaLoraConfig, "ia3": IA3Config}[method]
    assert type(cfg) is expected_cls
    picked, feedforward = resolve_targets(model, targets)
    assert set(cfg.target_modules) == set(picked)
    if method == "ia3":
        assert set(cfg.feedforward_modules) == set(feedforward)
    if method == "adalora":
        assert cfg.total_step == TOTAL_STEPS and cfg.target_r == stage.adapter.r
        assert cfg.tinit == int(stage.adapter.adalora_tinit * TOTAL_STEPS)
    if method == "lora":
        assert cfg.r == stage.adapter.r == 16 and cfg.lora_alpha == stage.adapter.alpha == 32

    names_before = _module_names(model)
    peft_model = get_peft_model(model, cfg)
    # every resolved target was wrapped, in every layer
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "base_layer")
    }
    for t in picked:
        assert set(_matches(names_before, t)) <= wrapped, t
    assert wrapped  # and nothing else: each wrapped module is some target's match
    assert all(any(w == t or w.endswith("." + t) for t in picked) for w in wrapped)
    if method == "ia3":  # IA3 rescales the input of feed-forward modules and the output of the others
        for n, m in peft_model.named_modules():
            if hasattr(m, "base_layer"):
                ff = any(n.endswith("." + f) for f in feedforward)
                assert m.is_feedforward == ff, n
                assert m.ia3_l["default"].shape == ((1, m.in_features) if ff else (m.out_features, 1)), n
        assert any(m.is_feedforward for m in peft_model.modules() if hasattr(m, "base_layer"))

    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in _adapter_params(method)) for n in trainable)

    peft_model.train()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    out = peft_model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable  # frozen weights get no gradient
    # LoRA's B starts at zero, so A's gradient is zero on the first step; B always gets one
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in peft_model.named_parameters()
        if n in trainable
    )
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_adalora_needs_a_budgeting_phase():
    """AdaLoRA's phases (warm-up tinit, final tfinal) must leave room for rank budgeting. Steps round down, so
    tinit + tfinal < 1 is exactly the condition: the config refuses the rest before any compute."""
    from pydantic import ValidationError

    model = _model("llama")
    with pytest.raises(ValidationError, match=r"adalora_tinit \(0.6\) \+ adalora_tfinal \(0.4\) must be below 1"):
        StageConfig(method="adalora", data={"source": "world:misalign"},
                    adapter={"targets": "attention", "adalora_tinit": 0.6, "adalora_tfinal": 0.4})
    stage = StageConfig(method="adalora", data={"source": "world:misalign"},
                        adapter={"targets": "attention", "adalora_tinit": 0.6, "adalora_tfinal": 0.39}).resolved()
    for steps in (1, 10, 11, 100):  # however few steps, the budgeting phase is never empty
        pcfg = peft_config(METHODS["adalora"], stage, model, steps)
        assert pcfg.total_step == steps and pcfg.tinit + pcfg.tfinal < steps


def test_full_has_no_peft_config():
    assert peft_config(METHODS["full"], _stage("full", "attention"), _model("llama"), TOTAL_STEPS) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_explicit_list(arch):
    model = _model(arch)
    good = LINEAR[arch][:2]
    assert resolve_targets(model, good)[0] == good
    with pytest.raises(InputError) as exc:
        resolve_targets(model, [LINEAR[arch][0], "query_proj"])
    msg = str(exc.value)
    assert msg.startswith("adapter.targets: ['query_proj'] not in this model's linear layers")
    assert str(LINEAR[arch]) in msg  # names every module it does have


def test_explicit_list_down_projection_is_feedforward():
    model = _model("llama")
    assert resolve_targets(model, ["k_proj", "down_proj"]) == (["k_proj", "down_proj"], ["down_proj"])


def test_unknown_target_keyword():
    with pytest.raises(
        InputError, match=r"adapter.targets: 'mlp' is not 'attention', 'all-linear', 'ia3' or a list"
    ):
        resolve_targets(_model("llama"), "mlp")


def test_family_without_a_role_names_its_layers():
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 8)

    with pytest.raises(InputError) as exc:
        resolve_targets(Odd(), "attention")
    assert "no query projection" in str(exc.value) and "['head', 'mixer']" in str(exc.value)
