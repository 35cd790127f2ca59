"""VISTA3DModule: MONAI's VISTA3D (`vista3d132`) trained with class and point prompts, as the MONAI
`vista3d` bundle trains it, on ctseg's DataModules.

Labels arrive as TotalSegmentator class indices (v1 or v2); the module maps them to VISTA3D ids
(`ctseg.vista3d_labels.vista3d_ids`), so the network speaks VISTA3D ids and its weights exchange
with the bundle's `model.pt`. Validation and test run the automatic mode (one class prompt per
known class) through the same slab aggregation as SegResNet, and log Dice under the same names.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM
from torch import Tensor, nn

from ctseg.data.transforms import PipelineConfig
from ctseg.models.base import OptimizerFactory, SchedulerFactory, SegmentationModule
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.vista3d_prompts import PromptSampling, sample_prompt_pairs
from ctseg.models.weights import load_bundle_state_dict, load_into
from ctseg.sliding_window import BATCH_SIZE, MODE, OVERLAP
from ctseg.vista3d_labels import LAST_SUPPORTED, vista3d_ids, vista3d_labels

log = logging.getLogger(__name__)

# What `trainable` may name: the whole network, the heads (image encoder frozen), the point head.
TRAINABLE = ("all", "heads", "point_head")
# Which prompts the Dice term averages over: all (the bundle), or those with a non-empty target.
DICE_OVER = ("all", "foreground")
# Class embeddings of both heads (`vista3d132`: ids 0..511).
EMBEDDINGS = 512
# Checkpoint entry holding the prompt generator's state.
RNG_KEY = "vista3d_prompt_rng"
# Checkpoint key: the training steps whose prompts held clicks (0: the point head never trained).
CLICK_STEPS_KEY = "vista3d_click_steps"


@dataclass(frozen=True)
class Stage:
    """Training epochs (None: to the end), what trains in them and how prompts are drawn."""

    epochs: int | None
    trainable: str
    sampling: PromptSampling

    def __post_init__(self) -> None:
        """Refuse an unknown `trainable` and a non-positive length."""
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"a training stage needs epochs >= 1, got {self.epochs}")


def training_stages(base: Stage, stages: Sequence[Mapping[str, Any]] | None) -> list[Stage]:
    """The stages of `model.stages` (each `epochs`, optional `trainable` and prompt-sampling keys
    overriding `base`), or `base` alone for the whole run."""
    if not stages:
        return [base]
    fields = {"epochs", "trainable", *PromptSampling.__dataclass_fields__}
    result = []
    for i, spec in enumerate(stages):
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"model.stages[{i}] has unknown keys {unknown}; a stage takes "
                             f"{sorted(fields)}")
        if "epochs" not in spec and i < len(stages) - 1:
            raise ValueError(f"model.stages[{i}] needs epochs (only the last runs to the end)")
        sampling = {k: v for k, v in spec.items() if k not in ("epochs", "trainable")}
        result.append(Stage(epochs=spec.get("epochs"),
                            trainable=spec.get("trainable", base.trainable),
                            sampling=replace(base.sampling, **sampling)))
    return result


def stage_at(stages: Sequence[Stage], epoch: int) -> Stage:
    """The stage epoch `epoch` (from 0) belongs to; the last stage continues to the end."""
    end = 0
    for stage in stages:
        end += stage.epochs or 0
        if stage.epochs is None or epoch < end:
            return stage
    return stages[-1]


def build_vista3d(encoder_embed_dim: int = 48, blocks_down: Sequence[int] = (1, 2, 2, 4, 4),
                  in_channels: int = 1) -> VISTA3D:
    """VISTA3D as `monai.networks.nets.vista3d132` builds it, with the encoder's width and depth
    as arguments (the defaults give exactly `vista3d132`, the bundle's network)."""
    encoder = SegResNetDS2(in_channels=in_channels, blocks_down=tuple(blocks_down),
                           norm="instance", out_channels=encoder_embed_dim,
                           init_filters=encoder_embed_dim, dsdepth=1)
    point_head = PointMappingSAM(feature_size=encoder_embed_dim, n_classes=EMBEDDINGS,
                                 last_supported=LAST_SUPPORTED)
    class_head = ClassMappingClassify(n_classes=EMBEDDINGS, feature_size=encoder_embed_dim,
                                      use_mlp=True)
    return VISTA3D(image_encoder=encoder, class_head=class_head, point_head=point_head)


def with_background(logits: Tensor) -> Tensor:
    """(B, 1 + P, ...) float logits: a constant 0 background channel before VISTA3D's P object
    channels. Argmax over them is VISTA3D's own post-processing (`VistaPostTransformd`):
    background where no object logit is above 0, else the strongest object."""
    logits = logits.float()
    return torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)


class EncodedPatch(nn.Module):
    """Stands in for VISTA3D's image encoder with its outputs for one patch computed beforehand
    (`SegResNetDS2.forward`'s point branch, and its class branch already through the class head's
    `image_post_mapping`), so that MONAI's own `VISTA3D.forward` runs the rest per patch."""

    def __init__(self, point: Tensor | list, label: Tensor | list) -> None:
        """Hold the two branches (an empty list for a branch that was not computed)."""
        super().__init__()
        self.point, self.label = point, label

    def forward(self, x: Tensor, with_point: bool = True, with_label: bool = True
                ) -> tuple[Tensor | list, Tensor | list]:
        """The held (point branch, class branch), whatever `x`."""
        return self.point, self.label


class MappedClassHead(nn.Module):
    """`ClassMappingClassify.forward` for image features its `image_post_mapping` has already
    mapped (on a whole batch): class embeddings through the MLP, then one mask per class."""

    def __init__(self, head: ClassMappingClassify) -> None:
        """Share `head`'s class embeddings and MLP."""
        super().__init__()
        self.head = head

    def forward(self, src: Tensor, class_vector: Tensor) -> tuple[Tensor, Tensor]:
        """(masks (P, B, D, H, W), class embeddings) as ClassMappingClassify returns them."""
        b, c, h, w, d = src.shape
        class_embedding = self.head.class_embeddings(class_vector)
        if self.head.use_mlp:
            class_embedding = self.head.mlp(class_embedding)
        masks = class_embedding.squeeze() @ src.view(b, c, h * w * d)
        return masks.view(b, -1, h, w, d).transpose(0, 1), class_embedding


def encoded_patches(net: VISTA3D, images: Tensor, with_point: bool, with_label: bool
                    ) -> list[VISTA3D]:
    """One VISTA3D per patch of `images` (B, C, D, H, W) sharing `net`'s heads, whose image
    encoder and class head's image mapping answer that patch's slice of one batched pass. On CPU
    PyTorch runs small batch-1 3-D convolutions on its slow reference path: per patch, a batch of
    eight runs the encoder 4 x and the class head's mapping 9 x faster than one at a time (the
    small VISTA3D on 32 x 32 x 24 patches)."""
    point, label = net.image_encoder(images, with_point=with_point, with_label=with_label)
    if with_label:
        label = net.class_head.image_post_mapping(label)
    class_head = MappedClassHead(net.class_head)
    patches = []
    for i in range(images.shape[0]):
        shell = VISTA3D(EncodedPatch(point[i:i + 1] if with_point else [],
                                     label[i:i + 1] if with_label else []),
                        class_head=class_head, point_head=net.point_head)
        shell.auto_freeze, shell.point_freeze = net.auto_freeze, net.point_freeze
        patches.append(shell)
    return patches


def automatic_logits(net: VISTA3D, windows: Tensor, class_ids: Tensor) -> Tensor:
    """(B, 1 + P, *roi) logits of the automatic mode for a batch of windows: background, then
    one channel per class id (`with_background`)."""
    return with_background(net(windows, class_vector=class_ids.reshape(-1, 1), transpose=True))


class AutomaticVISTA3D(nn.Module):
    """VISTA3D's automatic mode for fixed class ids: (B, 1, *roi) -> (B, 1 + P, *roi) logits,
    background first (the image encoder and class head, as the bundle's TensorRT export)."""

    def __init__(self, net: nn.Module, class_ids: list[int]) -> None:
        """Wrap `net` prompting `class_ids` in every window."""
        super().__init__()
        self.net = net
        self.register_buffer("class_ids", torch.tensor(class_ids), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        """Background + one logit channel per class id."""
        return automatic_logits(self.net, image, self.class_ids)


class VISTA3DModule(SegmentationModule):
    """VISTA3D at `self.net` (keys of the bundle's `model.pt`), trained with prompts sampled per
    patch: sigmoid DiceCE per prompt (the bundle's loss), AdamW, optional warm-up cosine.

    `label_names` are the data's TotalSegmentator classes; each maps to a VISTA3D id (`vista_ids`)
    and classes without one (7 v1 heart/face classes) are neither prompted nor scored. `trainable`
    freezes parts: "heads" keeps the image encoder fixed, "point_head" trains the point head only.
    """

    leaves_parameters_unused = True  # a step without clicks leaves the point head out

    def __init__(
        self,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        in_channels: int = 1,
        encoder_embed_dim: int = 48,
        blocks_down: Sequence[int] = (1, 2, 2, 4, 4),
        max_prompt: int | None = None,
        max_foreprompt: int | None = None,
        max_backprompt: int | None = 1,
        max_point: int = 5,
        drop_label_prob: float = 0.25,
        drop_point_prob: float = 0.25,
        trainable: str = "all",
        seed: int = 0,
        pretrained: str | os.PathLike[str] | None = None,
        optimizer: OptimizerFactory | Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | Mapping[str, Any] | None = None,
        roi_size: Sequence[int] = (128, 128, 128),
        sw_batch_size: int = BATCH_SIZE,
        sw_overlap: float = OVERLAP,
        sw_mode: str = MODE,
        dice_over: str = "all",
        stages: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Store the architecture, prompt sampling and training settings."""
        if dice_over not in DICE_OVER:
            raise ValueError(f"dice_over must be one of {DICE_OVER}, got {dice_over!r}")
        base = Stage(epochs=None, trainable=trainable, sampling=PromptSampling(
            max_prompt=max_prompt, max_foreprompt=max_foreprompt, max_backprompt=max_backprompt,
            max_point=max_point, drop_label_prob=drop_label_prob, drop_point_prob=drop_point_prob))
        self.stages = training_stages(base, stages)
        self.stage = self.stages[0]
        super().__init__(
            num_classes=num_classes, label_names=label_names, optimizer=optimizer,
            scheduler=scheduler, roi_size=roi_size,
            sw_batch_size=sw_batch_size, sw_overlap=sw_overlap, sw_mode=sw_mode,
        )
        self.rng = random.Random(seed)
        self._rng_restored = False
        self.click_steps: int | None = 0

    def on_train_epoch_start(self) -> None:
        """Enter the training stage of this epoch (what trains, how prompts are drawn)."""
        stage = stage_at(self.stages, self.current_epoch)
        if stage is not self.stage or self.current_epoch == 0:
            if len(self.stages) > 1:
                log.info("VISTA3D training stage %d of %d from epoch %d: trainable=%s, %s",
                         self.stages.index(stage) + 1, len(self.stages), self.current_epoch,
                         stage.trainable, stage.sampling)
            self.stage = stage
            self.set_trainable(stage.trainable)

    @property
    def sampling(self) -> PromptSampling:
        """How prompts are drawn in the current training stage."""
        return self.stage.sampling

    def set_trainable(self, trainable: str) -> None:
        """Train the whole network (`all`), the heads (image encoder frozen) or the point head."""
        net = self.net
        net.requires_grad_(True)
        net.auto_freeze = net.point_freeze = False
        if trainable == "heads":
            net.image_encoder.requires_grad_(False)
        elif trainable == "point_head":
            net.set_auto_grad(auto_freeze=True)

    def on_fit_start(self) -> None:
        """Seed the prompt generator per DDP rank (rank 0 keeps `seed`), unless resumed."""
        if not self._rng_restored:
            self.rng.seed(self.hparams.seed + self.global_rank)

    def configure_models(self) -> None:
        """Build the network, map the classes to VISTA3D ids, load `pretrained`, freeze parts."""
        hp = self.hparams
        self.net = build_vista3d(hp.encoder_embed_dim, hp.blocks_down, hp.in_channels)
        ids = vista3d_ids(self.label_names)
        unknown = [n for n, i in zip(self.label_names, ids, strict=True) if i is None]
        if unknown:
            log.info("VISTA3D has no id for %d classes, which are not prompted or scored: %s",
                     len(unknown), ", ".join(unknown))
        known = [c for c in range(1, len(ids)) if ids[c] is not None]
        if not known:
            raise ValueError("none of the classes has a VISTA3D id; VISTA3D needs "
                             "TotalSegmentator structure names (data.version v1 or v2)")
        # Lookup tables. By class index: its VISTA3D id (0 when it has none) and the class index
        # it is scored as (0 when it has no id); by output channel: the class index; the VISTA3D
        # ids the module prompts, in channel order.
        buffers = {
            "vista_ids": [i or 0 for i in ids],
            "scored_classes": [c if i is not None else 0 for c, i in enumerate(ids)],
            "channel_classes": [0, *known],
            "prompt_ids": [ids[c] for c in known],
        }
        for name, values in buffers.items():
            self.register_buffer(name, torch.tensor(values), persistent=False)
        self.special = vista3d_labels().special
        if hp.pretrained:
            load_into(self.net, load_bundle_state_dict(hp.pretrained), source=hp.pretrained,
                      head_prefix="class_head.")
            log.info("loaded pretrained VISTA3D weights from %s", hp.pretrained)
        self.set_trainable(self.stage.trainable)

    def configure_losses(self) -> None:
        """The bundle's per-prompt sigmoid DiceCE (train.json `loss`)."""
        self.loss = DiceCELoss(include_background=True, sigmoid=True, smooth_dr=1e-5,
                               smooth_nr=0, squared_pred=True, to_onehot_y=False)

    def forward(self, image: Tensor, **prompts: Any) -> Tensor:
        """VISTA3D logits (P, 1, D, H, W) of one (1, C, D, H, W) patch for `prompts`
        (`class_vector`, `point_coords`, `point_labels`, ...; see monai VISTA3D.forward)."""
        return self.net(image, **prompts)

    def vista_labels(self, label: Tensor) -> Tensor:
        """A label patch of class indices as VISTA3D ids (unknown classes become 0)."""
        return self.vista_ids[label.long()]

    def training_loss(self, image: Tensor, label: Tensor, annotated: Tensor | None = None
                      ) -> Tensor:
        """Mean prompt loss over the patches of a batch: prompts drawn per patch, the image
        encoder run once on the whole batch, the heads per patch (MONAI's VISTA3D.forward). With
        `annotated` (partially labelled data) a patch is prompted only with the classes its
        dataset annotates: an absent class it does not label may be there, unlabelled."""
        labels = self.vista_labels(label[:, 0])
        prompt_ids = self.prompt_ids.tolist()
        prompts = []
        for i in range(image.shape[0]):
            ids = prompt_ids
            if annotated is not None:
                labelled = set(self.vista_ids[annotated[i].to(self.vista_ids.device)].tolist())
                ids = [v for v in prompt_ids if v in labelled]
            prompts.append(sample_prompt_pairs(labels[i], ids, self.rng, self.sampling,
                                               self.special))
        with_point = any(p.points is not None for p in prompts)
        if self.click_steps is not None and torch.is_grad_enabled():
            self.click_steps += int(with_point)
        nets = encoded_patches(self.net, image, with_point=with_point,
                               with_label=any(p.label_prompt is not None for p in prompts))
        losses = []
        for i, (net, p) in enumerate(zip(nets, prompts, strict=True)):
            logits = net(image[i:i + 1], point_coords=p.points, point_labels=p.point_labels,
                         class_vector=p.label_prompt)
            target = (labels[i][None] == p.prompt_class[:, :, None, None, None]).float()
            logits = logits.float()
            if self.hparams.dice_over == "all":
                losses.append(self.loss(logits, target))
                continue
            # The bundle loss's own two terms, its Dice over the prompts with a target only.
            fg = target.flatten(1).any(1)
            loss = self.loss.bce(logits, target)
            if fg.any():
                loss = loss + self.loss.dice(logits[fg], target[fg])
            losses.append(loss)
        return torch.stack(losses).mean()

    def _window_logits(self, windows: Tensor) -> Tensor:
        """Background + one channel per prompted class (`channel_classes` order)."""
        return automatic_logits(self.net, windows, self.prompt_ids)

    def predict_labels(self, image: Tensor) -> Tensor:
        """(D, H, W) class indices of a whole volume from the automatic mode."""
        channels = super().predict_labels(image)
        return self.channel_classes.to(channels.device)[channels.long()]

    def scored_labels(self, label: Tensor) -> Tensor:
        """Ground truth as scored: classes without a VISTA3D id count as background."""
        return self.scored_classes.to(label.device)[label.long()]

    def inference_model(self, pipeline: PipelineConfig) -> LoadedModel:
        """The network with the VISTA3D ids of this module's classes (its automatic mode)."""
        return LoadedModel(self.net, [], pipeline, self.roi, kind="vista3d",
                           known_ids=sorted(self.prompt_ids.tolist()),
                           click_steps=self.click_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the prompt generator's state, so a resumed run draws the prompts it would have,
        and the number of training steps with clicks."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[RNG_KEY] = self.rng.getstate()
        checkpoint[CLICK_STEPS_KEY] = self.click_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the prompt generator's state of a resumed run and its steps with clicks
        (None when the checkpoint does not record them)."""
        self.click_steps = checkpoint.get(CLICK_STEPS_KEY)
        state = checkpoint.get(RNG_KEY)
        if state is not None:
            version, internal, gauss = state
            self.rng.setstate((version, tuple(internal), gauss))
            self._rng_restored = True
