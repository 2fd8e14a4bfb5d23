"""The distributed pairwise loss: 2 real processes (gloo) == 1 process on the concatenated batch."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY, free_port
from oner.losses import clamp_logit_scale_, pairwise_loss, shared_text_loss, soft_target_loss

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


def _unit(*angles):
    """Rows (cos a, sin a): L2-normalised 2-d embeddings."""
    a = torch.tensor(angles)
    return torch.stack([a.cos(), a.sin()], dim=1)


def _ce(logits, targets):
    """Cross-entropy written out: the mean over rows of -sum_j targets_ij * log(softmax(logits_i)_j)."""
    e = logits.exp()
    return -(targets * (e / e.sum(dim=1, keepdim=True)).log()).sum(dim=1).mean()


def test_softmax_matches_clip_formula():
    # two orthogonal pairs at scale 2: every row sees logits (2, 0), so each direction is ln(1 + e^-2)
    e = torch.eye(2)
    assert pairwise_loss(e, e, torch.tensor(math.log(2.0))).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-6)
    # three rows, not symmetric: q -> k and k -> q differ
    q, k = _unit(0.0, 1.2, 2.9), _unit(0.3, 1.0, 2.0)
    logits = 3.0 * q @ k.t()
    expected = (_ce(logits, torch.eye(3)) + _ce(logits.t(), torch.eye(3))) / 2
    scale = torch.tensor(math.log(3.0))
    assert pairwise_loss(q, k, scale).item() == pytest.approx(expected.item(), rel=1e-6)
    # one process: the local loss is the same thing
    assert pairwise_loss(q, k, scale, local_loss=True).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sigmoid_matches_siglip_formula():
    # two orthogonal pairs, scale 2, bias -1: logits [[1, -1], [-1, 1]], every pair on its right side by 1
    e = torch.eye(2)
    loss = pairwise_loss(e, e, torch.tensor(math.log(2.0)), kind="sigmoid", logit_bias=torch.tensor(-1.0))
    assert loss.item() == pytest.approx(4 * math.log1p(math.exp(-1)) / 2, rel=1e-6)  # 4 terms over 2 rows
    # -sum_ij log sigmoid(y_ij * logit_ij) / n, with log sigmoid(x) = -log(1 + e^-x), y = +1 on the diagonal only
    q, k = _unit(0.0, 1.2, 2.9), _unit(0.3, 1.0, 2.0)
    logits = 3.0 * q @ k.t() - 2.0
    signs = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    expected = (1 + (-signs * logits).exp()).log().sum() / 3
    loss = pairwise_loss(q, k, torch.tensor(math.log(3.0)), kind="sigmoid", logit_bias=torch.tensor(-2.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_target_loss_against_hand_computed_values():
    # two orthogonal pairs at scale 2, targets 3/4 on the own column: each row is
    # -(3/4 ln p + 1/4 ln(1 - p)) with p = e^2 / (e^2 + 1), in both directions
    e = torch.eye(2)
    p = math.exp(2) / (math.exp(2) + 1)
    targets = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    loss = soft_target_loss(e, e, targets, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx(-(0.75 * math.log(p) + 0.25 * math.log(1 - p)), rel=1e-6)
    # three rows, targets not symmetric: the key -> query direction scores the TRANSPOSED targets
    q, k = _unit(0.0, 1.2, 2.9), _unit(0.3, 1.0, 2.0)
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.7, 0.3], [0.3, 0.0, 0.7]])
    logits = 3.0 * q @ k.t()
    expected = (_ce(logits, targets) + _ce(logits.t(), targets.t())) / 2
    loss = soft_target_loss(q, k, targets, torch.tensor(math.log(3.0)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        soft_target_loss(q, k, targets[:2], torch.tensor(0.0))


def test_shared_text_loss_keeps_a_text_only_joint_embedding_off_its_minimum():
    """Targets e1, e2 (d = 3). A joint embedding that is its caption's alone comes out the same over
    the context without the image, so each target sees it twice: at scale s the loss is
    (ln(1 + e^-s) + ln(2 + 2 e^-s)) / 2 > ln(2) / 2 whatever s. A joint embedding that carries the
    image, against a negative e3 orthogonal to every target, gets (ln(1 + e^-s) + ln(1 + 3 e^-s)) / 2."""
    targets = torch.eye(3)[:2]
    other = torch.eye(3)[[2, 2]]
    for s in (4.0, 100.0):
        scale = torch.tensor(math.log(s))
        text_only = shared_text_loss(targets, targets, targets, scale).item()
        assert text_only == pytest.approx((math.log1p(math.exp(-s)) + math.log(2 + 2 * math.exp(-s))) / 2, rel=1e-6)
        assert text_only > math.log(2) / 2
        with_image = shared_text_loss(targets, other, targets, scale).item()
        expected = (math.log1p(math.exp(-s)) + math.log1p(3 * math.exp(-s))) / 2
        assert with_image == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # three rows: joint -> targets over the batch, targets -> [joint; joint_negative]
    joint, negative, image = _unit(0.0, 1.2, 2.9), _unit(0.5, 1.7, 2.4), _unit(0.3, 1.0, 2.0)
    expected = (_ce(3.0 * joint @ image.t(), torch.eye(3))
                + _ce(3.0 * image @ torch.cat([joint, negative]).t(), torch.eye(3, 6))) / 2
    loss = shared_text_loss(joint, negative, image, torch.tensor(math.log(3.0)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        shared_text_loss(joint, negative[:2], image, torch.tensor(0.0))


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
