"""VISTA3DModule: the bundle's network and weights, prompt training steps, checkpoint state."""

from __future__ import annotations

import random

import pytest
import torch
from lightning import Callback, Trainer
from monai.losses import DiceLoss
from monai.networks.nets import vista3d132
from torch.utils.data import DataLoader

from ctseg.labels import label_names
from ctseg.models.vista3d import (
    CLICK_STEPS_KEY,
    RNG_KEY,
    Stage,
    VISTA3DModule,
    stage_at,
    training_stages,
)
from ctseg.models.vista3d_prompts import PromptSampling, sample_prompt_pairs
from ctseg.models.weights import save_bundle_state_dict

SMALL = {"encoder_embed_dim": 16, "blocks_down": (1, 1, 1, 1), "roi_size": (32, 32, 24)}


@pytest.fixture(scope="module")
def bundle_weights(tmp_path_factory: pytest.TempPathFactory):
    """vista3d132 as the bundle's configs/inference.json builds it, saved as its models/model.pt."""
    torch.manual_seed(0)
    net = vista3d132(in_channels=1).eval()
    path = tmp_path_factory.mktemp("vista3d_bundle") / "model.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_bundle_network_round_trips_through_ctseg(bundle_weights, tmp_path):
    net, path = bundle_weights
    module = VISTA3DModule(118, label_names("v2"), pretrained=str(path)).eval()
    theirs, ours = net.state_dict(), module.net.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1], [3], [5]])
    points, point_labels = torch.tensor([[[10.0, 12.0, 14.0]]]), torch.tensor([[1]])
    with torch.no_grad():
        assert torch.equal(module(image, class_vector=ids), net(image, class_vector=ids))
        assert torch.equal(module(image, point_coords=points, point_labels=point_labels),
                           net(image, point_coords=points, point_labels=point_labels))
    written = save_bundle_state_dict(module, tmp_path / "model.pt")
    again = torch.load(written, weights_only=True)
    assert list(again) == list(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)


def _batch(foreground: bool) -> dict[str, torch.Tensor]:
    label = torch.zeros(2, 1, 32, 32, 24, dtype=torch.long)
    if foreground:
        label[0, 0, 4:14, 4:14, 4:12] = label_names("v1").index("liver")
        label[1, 0, 16:28, 10:20, 6:18] = label_names("v1").index("spleen")
    return {"image": torch.rand(2, 1, 32, 32, 24), "label": label}


@pytest.mark.parametrize("foreground", [True, False])
def test_training_step_with_batch_of_two_always_has_a_loss(foreground: bool):
    module = VISTA3DModule(105, label_names("v1"), **SMALL)
    for _ in range(4):  # prompts and drops vary from step to step
        loss = module.training_step(_batch(foreground), 0)
        assert torch.isfinite(loss) and loss.requires_grad
        loss.backward()
    grads = [p.grad for p in module.net.image_encoder.parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_a_partially_labelled_patch_is_prompted_with_its_annotated_classes_only(monkeypatch):
    module = VISTA3DModule(105, label_names("v1"), **SMALL)
    seen: list[list[int]] = []

    def recorded(labels, label_set, *args):
        seen.append(list(label_set))
        return sample_prompt_pairs(labels, label_set, *args)

    monkeypatch.setattr("ctseg.models.vista3d.sample_prompt_pairs", recorded)
    annotated = torch.zeros(2, 105, dtype=torch.bool)
    annotated[:, 0] = True
    annotated[0, [label_names("v1").index(n) for n in ("liver", "aorta")]] = True
    annotated[1] = True
    loss = module.training_step({**_batch(True), "annotated": annotated}, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    liver_aorta = sorted(module.vista_ids[annotated[0]].tolist()[1:])
    assert sorted(seen[0]) == liver_aorta and seen[1] == module.prompt_ids.tolist()


@pytest.mark.parametrize("drops", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_batched_encoder_gives_monai_forward_loss_and_gradients(drops: tuple[float, float]):
    """One encoder pass over the batch, then heads per patch, equals MONAI's VISTA3D.forward run
    on each patch alone with the same prompts (loss and every gradient)."""
    label_drop, point_drop = drops
    module = VISTA3DModule(105, label_names("v1"), drop_label_prob=label_drop,
                           drop_point_prob=point_drop, **SMALL)
    batch = _batch(True)
    batch["image"] = torch.cat([batch["image"]] * 2)
    batch["label"] = torch.cat([batch["label"], batch["label"].flip(2)])
    state = module.rng.getstate()
    loss = module.training_loss(batch["image"], batch["label"])
    loss.backward()
    ours = {n: p.grad.clone() for n, p in module.net.named_parameters() if p.grad is not None}
    module.zero_grad()
    module.rng.setstate(state)
    labels = module.vista_labels(batch["label"][:, 0])
    losses = []
    for i in range(4):
        p = sample_prompt_pairs(labels[i], module.prompt_ids.tolist(), module.rng,
                                module.sampling, module.special)
        logits = module.net(batch["image"][[i]], point_coords=p.points,
                            point_labels=p.point_labels, class_vector=p.label_prompt)
        target = (labels[i][None] == p.prompt_class[:, :, None, None, None]).float()
        losses.append(module.loss(logits.float(), target))
    reference = torch.stack(losses).mean()
    reference.backward()
    theirs = {n: p.grad for n, p in module.net.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-7)
    assert ours.keys() == theirs.keys() and ours
    # Batched and batch-1 convolutions run different CPU kernels: float32 rounding, amplified
    # through the instance norms (biases before a norm get rounding noise only).
    mine = torch.cat([ours[n].flatten() for n in theirs])
    reference_grads = torch.cat([theirs[n].flatten() for n in theirs])
    assert (mine - reference_grads).norm() < 1e-3 * reference_grads.norm()


def test_frozen_encoder_gets_no_gradient():
    module = VISTA3DModule(105, label_names("v1"), trainable="heads", **SMALL)
    module.training_step(_batch(True), 0).backward()
    assert all(p.grad is None for p in module.net.image_encoder.parameters())
    assert any(p.grad is not None for p in module.net.class_head.parameters())


def test_unknown_trainable_and_classes_without_ids_are_refused():
    with pytest.raises(ValueError, match="trainable"):
        VISTA3DModule(105, label_names("v1"), trainable="encoder", **SMALL)
    with pytest.raises(ValueError, match="VISTA3D id"):
        VISTA3DModule(3, ["background", "thing", "other"], **SMALL)


def test_prompt_generator_state_travels_in_the_checkpoint():
    module = VISTA3DModule(105, label_names("v1"), seed=3, **SMALL)
    module.rng.random()
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = module.rng.random()
    resumed = VISTA3DModule(105, label_names("v1"), seed=99, **SMALL)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.rng.random() == expected
    assert isinstance(checkpoint[RNG_KEY], tuple)
    assert random.Random(3).random() != expected


def test_validation_maps_automatic_labels_back_to_class_indices():
    module = VISTA3DModule(105, label_names("v1"), **SMALL).eval()
    labels = module.predict_labels(torch.rand(1, 1, 40, 36, 24))
    assert labels.shape == (40, 36, 24)
    known = set(module.channel_classes.tolist())
    assert set(labels.unique().tolist()) <= known


def test_foreground_dice_leaves_empty_prompts_to_the_cross_entropy():
    """dice_over=foreground: the Dice term averages over prompts with a non-empty target only
    (an empty target's Dice is a constant 1 in the bundle's loss); the BCE covers every prompt."""
    label = _batch(True)["label"][:1]  # the liver only
    image = torch.rand(1, 1, 32, 32, 24)
    knobs = {"max_backprompt": 3, "drop_label_prob": 0.0, "drop_point_prob": 1.0, "seed": 5}
    bundle = VISTA3DModule(105, label_names("v1"), **knobs, **SMALL)
    ours = VISTA3DModule(105, label_names("v1"), dice_over="foreground", **knobs, **SMALL)
    ours.net.load_state_dict(bundle.net.state_dict())
    losses = {"all": bundle.training_loss(image, label),
              "foreground": ours.training_loss(image, label)}
    vista = bundle.vista_labels(label[:, 0])[0]
    p = sample_prompt_pairs(vista, bundle.prompt_ids.tolist(), random.Random(5),
                            bundle.sampling, bundle.special)
    liver = label_names("v1").index("liver")
    assert p.prompt_class.flatten().tolist()[0] == bundle.vista_ids[liver]
    assert len(p.prompt_class) == 4  # the liver, then three absent classes
    with torch.no_grad():
        logits = bundle.net(image, class_vector=p.label_prompt).float()
    target = (vista[None] == p.prompt_class[:, :, None, None, None]).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    liver_dice = DiceLoss(sigmoid=True, smooth_dr=1e-5, smooth_nr=0, squared_pred=True)(
        logits[:1], target[:1])
    torch.testing.assert_close(losses["foreground"].detach(), bce + liver_dice)
    torch.testing.assert_close(losses["all"].detach(), bce + (liver_dice + 3) / 4)


def test_stages_switch_what_trains_by_epoch(tmp_path):
    """model.stages: the automatic branch for one epoch, then the point head on the frozen
    encoder (points only): the encoder and class head stop changing, the point head learns."""
    stages = [{"epochs": 1, "drop_label_prob": 0.0, "drop_point_prob": 1.0},
              {"trainable": "point_head", "drop_label_prob": 1.0, "drop_point_prob": 0.0}]
    module = VISTA3DModule(105, label_names("v1"), stages=stages, **SMALL)
    batch = _batch(True)
    data = [{"image": batch["image"][i], "label": batch["label"][i]} for i in range(2)]
    snapshots = []

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append({n: p.detach().clone()
                              for n, p in pl_module.net.state_dict().items()})

    initial = {n: p.detach().clone() for n, p in module.net.state_dict().items()}
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[Snapshot()], limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert module.stage is module.stages[1] and module.sampling.drop_label_prob == 1.0
    first, _, last = snapshots

    def changed(a: dict, b: dict, prefix: str) -> bool:
        return any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))

    assert changed(initial, first, "image_encoder.encoder.")
    assert changed(initial, first, "class_head.")
    assert not changed(initial, first, "point_head.")
    assert not changed(first, last, "image_encoder.encoder.")
    assert not changed(first, last, "image_encoder.up_layers_auto.")
    assert not changed(first, last, "class_head.")
    assert changed(first, last, "point_head.")
    assert changed(first, last, "image_encoder.up_layers.")
    # One step per epoch, with clicks in the second stage only: the checkpoint records 2 (what
    # predict.py's warning of an untrained point head reads).
    assert module.click_steps == 2
    trainer.save_checkpoint(tmp_path / "staged.ckpt")
    assert torch.load(tmp_path / "staged.ckpt", weights_only=True)[CLICK_STEPS_KEY] == 2
    loaded = VISTA3DModule.load_from_checkpoint(tmp_path / "staged.ckpt", weights_only=True)
    assert loaded.click_steps == 2


def test_stages_are_checked_and_found_by_epoch():
    base = Stage(epochs=None, trainable="all", sampling=PromptSampling())
    stages = training_stages(base, [{"epochs": 2, "drop_point_prob": 1.0},
                                    {"epochs": 1, "trainable": "heads"},
                                    {"trainable": "point_head", "max_point": 2}])
    assert [stage_at(stages, e).trainable for e in range(6)] == [
        "all", "all", "heads", "point_head", "point_head", "point_head"]
    assert stages[0].sampling == PromptSampling(drop_point_prob=1.0)
    assert stages[2].sampling == PromptSampling(max_point=2)
    assert training_stages(base, None) == [base]
    with pytest.raises(ValueError, match=r"stages\[0\] has unknown keys \['lr'\]"):
        training_stages(base, [{"epochs": 1, "lr": 1.0}])
    with pytest.raises(ValueError, match=r"stages\[0\] needs epochs"):
        training_stages(base, [{"trainable": "heads"}, {"trainable": "all"}])
    with pytest.raises(ValueError, match="trainable"):
        training_stages(base, [{"epochs": 1, "trainable": "encoder"}])
