"""The report model reads the image (#48): an adapter trained on a few images, each with its own report and the
same instruction-only prompt, writes each image's own report, and permuting the images permutes the reports.

With the prompt the same for every image, the image is the only thing that can tell the reports apart: a path that
lost the image (a zeroed cross-attention mask, pixels that never reach the vision tower, a tower whose output is
dropped) can at best write one report for all of them. The training and generation are the product's
(``vlm.train_adapter``: QLoRA on the 4-bit base, TRL's SFTTrainer, the collator; ``vlm.generate_reports``: greedy).
"""

from __future__ import annotations

import numpy as np
import pytest

from cxr_pipeline.reports import prompts, tiny_base, vlm

# four reports with nothing in common but the words a report uses: one per image
REPORTS = (
    "The heart is enlarged. Small left pleural effusion.",
    "No acute cardiopulmonary process.",
    "Right upper lobe consolidation, likely pneumonia.",
    "Large left apical pneumothorax. No effusion.",
)


def images(seed: int = 3) -> list[np.ndarray]:
    """One grey picture (noise and a bright square in a corner) turned by 0, 90, 180 and 270 degrees: the same
    pixels in each, so no per-image statistic (mean, histogram) tells them apart, only where the square is."""
    rng = np.random.default_rng(seed)
    picture = rng.normal(100, 25, (64, 64))
    picture[6:26, 6:26] += 110
    picture = np.clip(picture, 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(np.rot90(picture, k)) for k in range(len(REPORTS))]


def constant_pixels(mp: pytest.MonkeyPatch) -> None:
    """Every image reaches the processor as the same grey picture (training and generation)."""
    grey = prompts.to_rgb(np.full((64, 64), 128, np.uint8))
    mp.setattr(prompts, "to_rgb", lambda img: grey)
    mp.setattr(vlm, "to_rgb", lambda img: grey)


def vision_output_zeroed(mp: pytest.MonkeyPatch) -> None:
    """The vision tower's output replaced by zeros: the projector hands the text the same states for every image.

    (Zeroing the processor's ``cross_attention_mask`` instead does not cut the image off in transformers' Mllama:
    a row masked in full becomes an all-zero additive mask, attending to every tile, and only the cross-attention
    layer's MLP branch is multiplied by the row mask; the tried control still wrote every image's own report.)"""
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    forward = MllamaVisionModel.forward

    def zeroed(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 0
        return out

    mp.setattr(MllamaVisionModel, "forward", zeroed)


PATHS = {"intact": None, "constant pixels": constant_pixels, "vision output zeroed": vision_output_zeroed}


# 90 steps: 60 and 90 learned all four pairs for LoRA seeds 0, 1 and 2 (2026-12-06, 2-core AMD EPYC; with four
# brightness levels instead of turns, 40 steps learned two or three)
@pytest.fixture(scope="module", params=list(PATHS))
def trained(request, tmp_path_factory):
    """(path, the reports written for the images in order and permuted) after training on that image path."""
    import torch

    root = tmp_path_factory.mktemp("image_dependence")
    base = tiny_base.build_tiny_base(root / "base", list(REPORTS) * 10)
    train = [{"image": im, "prompt": prompts.user_prompt(), "report": r} for im, r in zip(images(), REPORTS, strict=True)]
    cfg = vlm.AdapterConfig(max_steps=90, batch_size=4, accumulation=1, lr=5e-3, warmup_steps=0, lr_schedule="constant")
    with pytest.MonkeyPatch.context() as mp:
        if PATHS[request.param] is not None:
            PATHS[request.param](mp)
        vlm.train_adapter(base, train * 4, cfg, root / "adapter", device=torch.device("cpu"))
        ims = images()
        written = [write(base, root / "adapter", [ims[i] for i in order]) for order in (ORDER, PERMUTED)]
    return request.param, written


ORDER, PERMUTED = [0, 1, 2, 3], [2, 0, 3, 1]


def write(base, adapter_dir, ims: list[np.ndarray]) -> list[str]:
    return vlm.generate_reports(base, adapter_dir, ims, [prompts.user_prompt()] * len(ims), max_new_tokens=24, batch_size=len(ims))


def test_each_image_gets_its_own_report_and_permuted_images_permute_the_reports(trained):
    """Intact: each image's own report, in order and permuted. With the image path broken on purpose the same
    training cannot tell the images apart: one report for all four (so this test fails on such a path)."""
    path, (in_order, permuted) = trained
    if path == "intact":
        assert in_order == list(REPORTS)
        assert permuted == [REPORTS[i] for i in PERMUTED]
    else:
        assert len(set(in_order)) == 1 and in_order != list(REPORTS), (path, in_order)
        assert permuted == in_order
