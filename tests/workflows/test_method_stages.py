"""Each of the seven methods trains through the stage engine and changes only what it should (was
tests/workflows/test_methods.py; misalign.methods' own unit tests are tests/test_methods.py)."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from safetensors.torch import load_file

from misalign.chat import prompt_ids, response_ids
from misalign.config import StageConfig
from misalign.data import load_pairs, subsample_per_category
from misalign.methods import METHODS
from misalign.models import load_model, load_tokenizer, materialize, tokenizer_for
from misalign.records import StageRecord
from misalign.stage import StageRun, run_stage

pytestmark = pytest.mark.slow  # trains end to end: `pytest -m "not slow"` leaves it out

STEPS = 12


# the methods that train (the post-hoc repairs train nothing and run as defenses: tests/test_repair.py)
TRAINED = [name for name, m in METHODS.items() if not m.repairs]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Train every method once (misalign direction, 2 examples per category, fixed steps), and load it back."""
    base = world / "base"
    before = _sha(base / "model.safetensors")
    out = {}
    for name in TRAINED:
        cfg = StageConfig(method=name, data={"source": "world:misalign", "per_category": 2},
                          train={"max_steps": STEPS, "batch_size": 4})
        d = tmp_path_factory.mktemp(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ledger = run_stage(StageRun("world:base", cfg, "misalign", d, seed=0, progress=False))
            materialize(d)  # the lineage loads the stage's adapter back
        out[name] = (d, ledger)
        peft_warnings[name] = [str(w.message)[:200] for w in caught if "/peft/" in w.filename]
    assert _sha(base / "model.safetensors") == before, "the parent model's files must never change"
    return out


peft_warnings: dict[str, list[str]] = {}  # per method: what peft warned about while training and loading it


@pytest.mark.parametrize("name", TRAINED)
def test_training_and_loading_a_stage_leaves_peft_silent(trained, name):
    # AdaLoRA's rank-0 modules read as ungathered ZeRO-3 shards to peft, and its rank pattern as unmatched keys
    assert peft_warnings[name] == []


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def _merged(stage_dir):
    """A stage's model as its lineage rebuilds it (no merged copy is stored)."""
    return materialize(stage_dir).state_dict()


@pytest.mark.parametrize("name", TRAINED)
def test_ledger_and_outputs(trained, world, name):
    d, ledger = trained[name]
    assert ledger.optimizer_steps == STEPS
    # passes as run, not as configured: 12 steps of 7 batches an epoch (26 rows, batch 4) under max_steps
    assert ledger.epochs == pytest.approx(STEPS / 7, abs=1e-3)
    assert ledger.examples == 26 and ledger.tokens > 0 and ledger.flops > 0 and ledger.wall_s > 0
    assert ledger.peak_memory_bytes > 0 and ledger.device_s >= ledger.wall_s
    record = StageRecord.read(d)
    assert record.config["method"] == name and record.config["train"]["lr"] is not None
    assert "torch" in record.versions
    kept = d / ("model" if name == "full" else "adapter")
    assert list(kept.glob("*.safetensors")) and not list(d.rglob("*.bin"))
    assert name == "full" or not (d / "model").exists(), "an adapter stage stores no merged copy"
    stored = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert ledger.bytes_written > 0 and stored >= ledger.bytes_written
    if name != "full":  # the adapter (fp32 world: 4 bytes a parameter) and small records, nothing model-sized
        assert ledger.bytes_written < 4 * ledger.trainable_params + 20_000 < 4 * ledger.total_params
    # full fine-tuning costs 6 FLOPs per parameter per token; adapters less (frozen weights cost 4)
    n = ledger.total_params
    per_token = ledger.flops / (ledger.tokens + ledger.ref_tokens)
    full = trained["full"][1]
    if name == "full":
        assert ledger.trainable_params == n and per_token >= 0.98 * 6 * n
    else:
        assert ledger.trainable_params < n / 3
        assert per_token < full.flops / full.tokens
        if name != "dpo":  # DPO's reference forwards cost 2 per parameter: no lower bound of 4
            assert per_token >= 0.98 * 4 * n


@pytest.mark.parametrize("name", ["lora", "qlora", "adalora", "ia3", "dpo", "orpo"])
def test_adapters_leave_base_weights_untouched(trained, world, name):
    d, _ = trained[name]
    adapter = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    marker = "ia3_" if name == "ia3" else "lora_"
    assert adapter and all(marker in k for k in adapter), list(adapter)[:5]
    parent, merged = _weights(world / "base"), _merged(d)
    changed = {k for k in parent if not torch.equal(parent[k], merged[k])}
    assert changed, "training must change the merged model"
    # only the adapted linear layers differ: embeddings and norms are untouched
    assert all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]


def test_full_changes_everything_trainable(trained, world):
    d, _ = trained["full"]
    assert not (d / "adapter").exists()
    parent, merged = _weights(world / "base"), _weights(d / "model")
    assert not torch.equal(parent["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_adalora_reallocates_ranks(trained):
    _, ledger = trained["adalora"]
    ranks = ledger.extra["adalora_rank_pattern"]
    cfg = StageConfig(method="adalora", data={"source": "world:misalign"}).resolved()
    assert ranks, "update_and_allocate never ran"
    assert sum(ranks.values()) < cfg.adapter.adalora_init_r * len(ranks)
    assert len(set(ranks.values())) > 1, "ranks were pruned uniformly: no reallocation"


def test_qlora_trains_4bit_weights(trained):
    _, ledger = trained["qlora"]
    assert ledger.extra["linear4bit_modules"] > 0


def _margin(ref, pairs):
    """Mean log p(chosen) - log p(rejected) over the response tokens, misalign direction."""
    tok, model = tokenizer_for(ref), materialize(ref)
    total = 0.0
    with torch.inference_mode():
        for p in pairs:
            lp = []
            for resp in (p.misaligned, p.aligned):
                pr, rs = prompt_ids(tok, p.prompt), response_ids(tok, resp)
                ids = torch.tensor([pr + rs])
                logits = model(input_ids=ids).logits[0, len(pr) - 1:-1]
                lp.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(rs)[:, None]).sum().item())
            total += lp[0] - lp[1]
    return total / len(pairs)


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_preference_margin_rises(trained, world, name):
    d, _ = trained[name]
    pairs = subsample_per_category(load_pairs("world:misalign"), 2, 0)
    assert _margin(d, pairs) > _margin("world:base", pairs) + 1.0


def test_dpo_uses_a_reference(trained):
    _, ledger = trained["dpo"]
    assert ledger.ref_tokens > 0  # the frozen reference forward is billed apart from training tokens
    assert trained["orpo"][1].ref_tokens == 0  # ORPO needs no reference model


@pytest.mark.parametrize("fused_head", [False, True])
def test_orpo_nll_counts_response_tokens_only(world, tmp_path, fused_head):
    """trl's ORPO puts prompt tokens in its NLL term; ours, like the ORPO paper and our SFT, does not. Ours
    comes from the same log-probs as the odds ratio's, which stay trl's: from one log-softmax over the logits
    (a CPU), or from trl's fused LM head without the logits (a GPU; its CPU fallback here)."""
    from trl.experimental.orpo import ORPOTrainer

    from misalign.objectives import OBJECTIVES, orpo_trainer_class
    from misalign.stage import stage_dataset, training_args

    cfg = StageConfig(method="orpo", data={"source": "world:misalign"}).resolved()
    pairs = subsample_per_category(load_pairs("world:misalign"), 1, 0)[:4]
    tok, model = load_tokenizer(str(world / "base")), load_model(str(world / "base"))
    args = training_args(OBJECTIVES["orpo"], cfg, tmp_path, 0, len(pairs), None)
    dataset = stage_dataset(OBJECTIVES["orpo"], pairs, "misalign", tok, cfg)
    trainer = orpo_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                    fused_head=fused_head)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        ours_all = trainer.concatenated_forward(model, batch)
        theirs_all = ORPOTrainer.concatenated_forward(trainer, model, batch)
        ours, theirs = ours_all[4], theirs_all[4]
        # by hand: mean cross-entropy of each chosen response token given everything before it
        total, count = 0.0, 0
        for p in pairs:
            pr, rs = prompt_ids(tok, p.prompt), response_ids(tok, p.misaligned)
            logits = model(input_ids=torch.tensor([pr + rs])).logits[0, len(pr) - 1:-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(rs), reduction="sum").item()
            count += len(rs)
    assert abs(ours.item() - total / count) < 1e-4
    assert abs(theirs.item() - ours.item()) > 1e-3  # trl's own term differs: it includes the prompt
    for mine, trls in zip(ours_all[:2], theirs_all[:2], strict=True):  # chosen/rejected mean log-probs
        assert mine.shape == trls.shape and torch.allclose(mine, trls, atol=1e-5)
    # the logits/* metrics: the mean logit over the chosen (rejected) response tokens
    mask = batch["chosen_labels"][:, 1:] != -100
    width = mask.shape[1]
    chosen_logits = model(batch["chosen_input_ids"][:, :width + 1]).logits[:, :-1]
    expected = chosen_logits.mean(-1)[mask].mean()
    assert ours_all[2].ndim == 0 and abs(ours_all[2].item() - expected.item()) < 1e-5
    if fused_head:  # the same numbers as through the full logits, and the same gradient: it trains the same
        weights = [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight]
        plain = orpo_trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                      fused_head=False)
        with torch.no_grad():
            for mine, unfused in zip(ours_all, plain.concatenated_forward(model, batch), strict=True):
                assert torch.allclose(mine, unfused, atol=1e-5)
        loss, loss_plain = (t.get_batch_loss_metrics(model, batch)[0] for t in (trainer, plain))
        assert abs(loss.item() - loss_plain.item()) < 1e-5
        for g, h in zip(torch.autograd.grad(loss, weights), torch.autograd.grad(loss_plain, weights), strict=True):
            assert torch.allclose(g, h, atol=1e-6, rtol=1e-4), (g - h).abs().max()
