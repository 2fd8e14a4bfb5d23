"""The distributed pairwise loss: 2 real processes (gloo) == 1 process on the concatenated batch."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY, free_port
from oner.losses import clamp_logit_scale_, pairwise_loss

SETTINGS = [  # (objective, pairwise kind, local_loss)
    ("xmc+cmc", "softmax", False),
    ("xmc+cmc", "softmax", True),
    ("itc+cic", "sigmoid", True),
]


def _features(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    k = torch.nn.functional.normalize(q + 0.3 * torch.randn(n, d, generator=g), dim=-1)
    return q, k


def test_softmax_matches_clip_formula():
    q, k = _features()
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * q @ k.t()
    labels = torch.arange(len(q))
    expected = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(pairwise_loss(q, k, scale), expected)
    # one process: local loss is the same thing
    assert torch.allclose(pairwise_loss(q, k, scale, local_loss=True), expected)


def test_sigmoid_matches_siglip_formula():
    q, k = _features()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-2.0)
    logits = 10.0 * q @ k.t() - 2.0
    signs = 2 * torch.eye(len(q)) - 1
    expected = -torch.nn.functional.logsigmoid(signs * logits).sum() / len(q)
    assert torch.allclose(pairwise_loss(q, k, scale, kind="sigmoid", logit_bias=bias), expected)


def test_unknown_kind_and_missing_bias():
    q, k = _features()
    with pytest.raises(ValueError, match="unknown pairwise"):
        pairwise_loss(q, k, torch.tensor(1.0), kind="hinge")
    with pytest.raises(ValueError, match="logit_bias"):
        pairwise_loss(q, k, torch.tensor(1.0), kind="sigmoid")


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p)
    assert p.item() == pytest.approx(math.log(100))
    p.data.fill_(-1.0)
    clamp_logit_scale_(p)
    assert p.item() == 0.0


# --------------------------------------------------------------------------- two processes


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (n, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0  # some padding
    pixels = torch.randn(n, 3, TINY["image_size"], TINY["image_size"], generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _pretrainer(objective, kind, local):
    from modeling_oner import OneRConfig, OneRModel
    from oner.objectives import Objective, ObjectiveConfig, parse_objective
    from oner.training.pretrainer import OneRPretrainer

    # CMC on every row of its own pair: the rows a fraction picks and the images a mosaic borrows are
    # those of each process's micro-batch, which differ from the concatenated batch's by design.
    config = ObjectiveConfig(weights=parse_objective(objective), pairwise=kind, local_loss=local, cmc_context="pair",
                             cmc_fraction=1.0, xmc_form="cross-pair" if kind == "softmax" else "same-pair")
    torch.manual_seed(0)
    model = OneRModel(OneRConfig.from_preset("tiny", **TINY, **config.model_settings))
    pretrainer = OneRPretrainer(model, config)
    if pretrainer.logit_bias is not None:
        torch.nn.init.constant_(pretrainer.logit_bias, -1.0)  # away from -10 so the bias matters
    return pretrainer, Objective(config)


def _loss_and_grads(pretrainer, objective, batch):
    loss, _ = objective(pretrainer(**batch))
    loss.backward()
    module = getattr(pretrainer, "module", pretrainer)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    results = {"world_size": dist.get_world_size(), "pid": os.getpid()}
    full = _batch()
    n = len(full["input_ids"]) // world_size
    shard = {k: v[rank * n : (rank + 1) * n] for k, v in full.items()}
    for setting in SETTINGS:
        pretrainer, objective = _pretrainer(*setting)
        ddp = DistributedDataParallel(pretrainer)  # averages gradients over ranks, as accelerate's DDP does
        loss, grads = _loss_and_grads(ddp, objective, shard)
        losses = [torch.zeros(()) for _ in range(world_size)]
        dist.all_gather(losses, loss)
        results[setting] = {"losses": torch.stack(losses), "grads": grads}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()



def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two real processes ran

    for setting in SETTINGS:
        pretrainer, objective = _pretrainer(*setting)
        loss, grads = _loss_and_grads(pretrainer, objective, _batch())
        rank_losses = ranks[0][setting]["losses"]
        local = setting[2]
        # full loss: every rank computes the global loss; local loss: the ranks' mean is the global loss
        observed = rank_losses.mean() if local else rank_losses[0]
        assert torch.allclose(observed, loss, atol=1e-5), (setting, rank_losses, loss)
        if not local:
            assert torch.allclose(rank_losses[0], rank_losses[1], atol=1e-6)
        for rank in ranks:
            assert set(rank[setting]["grads"]) == set(grads), setting
            for name, g in grads.items():
                assert torch.allclose(rank[setting]["grads"][name], g, atol=1e-5, rtol=1e-4), (setting, name)
