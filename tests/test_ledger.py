"""The ledger's FlopCounter sums on the device and reads once: its counts equal the per-forward host count."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from misalign.ledger import FlopCounter, matmul_params
from misalign.models import load_model
from misalign.world import world_model


class HostCount:
    """The reference: the counter as it was, one `int(mask.sum())` (a device->host read) per forward."""

    def __init__(self, model: torch.nn.Module, layers: int, d_model: int) -> None:
        self.model, self.layers, self.d_model = model, layers, d_model
        self.tokens = self.ref_tokens = 0
        self.flops = 0.0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        n = int(mask.sum()) if mask is not None else ids.numel()
        frozen, trainable = matmul_params(self.model)
        attn = 4 * self.layers * self.d_model * ids.shape[-1]
        if torch.is_grad_enabled():
            self.tokens += n
            self.flops += n * (4 * frozen + 6 * trainable + 3 * attn)
        else:
            self.ref_tokens += n
            self.flops += n * (2 * (frozen + trainable) + attn)


def _batch(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (rows, width), generator=g)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()  # left padding, as generation uses
    return ids, mask


def test_device_sums_equal_per_forward_host_counts():
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(world_model("base"))),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    cfg = model.base_model.model.config
    counter = FlopCounter(model, cfg.num_hidden_layers, cfg.hidden_size)
    host = HostCount(model, cfg.num_hidden_layers, cfg.hidden_size)
    for step in range(6):
        ids, mask = _batch(4 + step, 10 + 7 * step, step)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # training forward
        with torch.no_grad():  # a reference-model forward (DPO), billed apart
            model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids)  # no mask: every token counts
    counter.close()
    host.handle.remove()
    assert host.tokens > 0 and host.ref_tokens > 0
    assert (counter.tokens, counter.ref_tokens, counter.flops) == (host.tokens, host.ref_tokens, host.flops)
    ids, mask = _batch(3, 9, 99)
    model(input_ids=ids, attention_mask=mask)  # closed: no longer counted
    assert (counter.tokens, counter.flops) == (host.tokens, host.flops)


def test_padding_free_row_bills_each_sequence_its_own_length():
    model = load_model(str(world_model("base")))
    cfg = model.config
    counter = FlopCounter(model, cfg.num_hidden_layers, cfg.hidden_size)
    lengths = [5, 9, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    model(input_ids=torch.randint(3, 1000, (1, sum(lengths))), position_ids=positions)
    # the same three sequences one at a time: no padding, so the old and new rules agree
    for n in lengths:
        model(input_ids=torch.randint(3, 1000, (1, n)))
    counter.close()
    frozen, trainable = matmul_params(model)
    attn = 4 * cfg.num_hidden_layers * cfg.hidden_size
    one = sum(n * (4 * frozen + 6 * trainable) + 3 * attn * n * n for n in lengths)
    assert counter.tokens == 2 * sum(lengths)
    assert counter.flops == 2 * one


def test_pad_tokens_of_a_padding_free_row_are_not_billed():
    """train.pad_to_multiple_of on a padding-free row: trl's collator appends pad tokens at position 0; the
    ledger bills the row as the same sequences unpadded (as a padded batch's pads are left out by its mask)."""
    model = load_model(str(world_model("base")))
    cfg = model.config
    counts = []
    for pads in (0, 7):
        counter = FlopCounter(model, cfg.num_hidden_layers, cfg.hidden_size)
        lengths = [5, 9, 3]
        positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pads, dtype=torch.long)])[None]
        model(input_ids=torch.randint(3, 1000, (1, positions.shape[1])), position_ids=positions)
        counter.close()
        counts.append((counter.tokens, counter.flops))
    assert counts[0] == counts[1] and counts[0][0] == 17


@pytest.mark.gpu  # host syncs exist only with a device
def test_counter_never_syncs_the_device():
    model = load_model(str(world_model("base"))).cuda()
    counter = FlopCounter(model, model.config.num_hidden_layers, model.config.hidden_size)
    ids, mask = _batch(4, 16, 0)
    model(input_ids=ids.cuda(), attention_mask=mask.cuda())  # first call: allocates the sums
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counter._hook(model, (), {"input_ids": ids.cuda(), "attention_mask": mask.cuda()})
        with torch.no_grad():
            counter._hook(model, (), {"input_ids": ids.cuda(), "position_ids": torch.arange(16).cuda()[None]})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counter.tokens == 2 * int(mask.sum()) and counter.ref_tokens == 16
