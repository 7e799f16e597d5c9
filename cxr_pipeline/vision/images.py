"""Where a model's images live while it trains or predicts: resident on the device, or streamed from the shards.

One interface, two modes, the same batches:

- **resident** (``ResidentImages``): the split is read once into one ``uint8`` tensor on the training
  device (on a GPU: one copy in GPU memory, batches indexed and augmented there; the fastest path);
- **streamed** (``StreamedImages``): nothing is loaded; each batch is read from the memory-mapped shards
  by a ``torch.utils.data.DataLoader`` (worker processes, pinned memory and non-blocking copies on CUDA).
  Shard pages are file-backed page cache, so the process's own (anonymous) memory does not grow with
  the number of images: MIMIC's 243k frontal images at 512 px (64 GB) train on a host that has far less.

``choose_mode`` picks one from a memory budget (``TrainConfig.data`` null, ``memory_budget``). The training
loop draws the batch order and the augmentation from its own generator, in the main process, after a
batch has reached the device, so both modes train the same model from the same seed (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cxr_pipeline.data.shard_reader import StreamedImages
from cxr_pipeline.settings import usable_cpus

MODES = ("resident", "streamed")


class ResidentImages:
    """A uint8 tensor (n, size, size), on the CPU or a GPU; a subset is a view through an index, not a copy."""

    def __init__(self, tensor, index=None):
        self.tensor, self.index = tensor, index

    def __len__(self) -> int:
        return int(self.tensor.shape[0] if self.index is None else self.index.shape[0])

    def subset(self, idx: np.ndarray) -> ResidentImages:
        import torch

        pick = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.tensor.device)
        return ResidentImages(self.tensor, pick if self.index is None else self.index[pick])

    def take(self, idx):
        import torch

        pick = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.tensor.device)
        return self.tensor[pick if self.index is None else self.index[pick]]

    def __getitem__(self, i) -> np.ndarray:
        """One image or several, as numpy on the host (what the saliency sheets read)."""
        return self.take(np.atleast_1d(i)).cpu().numpy()[0 if not np.ndim(i) else slice(None)]

    @property
    def nbytes(self) -> int:
        return len(self) * int(self.tensor[0].numel()) if len(self) else 0


Images = ResidentImages | StreamedImages


def as_images(x) -> Images:
    """A tensor (what tests and callers with images in hand pass) as ``ResidentImages``; images as they are."""
    return x if isinstance(x, ResidentImages | StreamedImages) else ResidentImages(x)


def free_memory(device) -> int:
    """Bytes free where a resident split would live: the GPU's free memory on CUDA, the host's available memory otherwise."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def choose_mode(mode: str | None, nbytes: int, device, budget: float) -> str:
    """``resident`` or ``streamed``: as configured, or (None) resident when the images take at most
    ``budget`` of the memory free where they would live (``free_memory``)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"data must be one of {', '.join(MODES)} or null, not {mode!r}")
    if mode is not None:
        return mode
    return "resident" if nbytes <= budget * free_memory(device) else "streamed"


def make_resident(images: StreamedImages, device) -> ResidentImages:
    """Read every image once into one tensor on ``device`` (through pinned memory on CUDA)."""
    import torch

    t = torch.from_numpy(images.take(np.arange(len(images))))
    return ResidentImages(t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device))


def place(images: Sequence[StreamedImages], mode: str | None, device, budget: float) -> tuple[list[Images], str]:
    """The images of several splits, all resident or all streamed (one decision for what one run holds at once)."""
    chosen = choose_mode(mode, sum(i.nbytes for i in images), device, budget)
    return ([make_resident(i, device) for i in images] if chosen == "resident" else list(images)), chosen


class _Batches:
    """The map-style dataset a streaming loader reads: item k is batch k's images."""

    def __init__(self, images: StreamedImages, batches: Sequence[np.ndarray]):
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        import torch

        return torch.from_numpy(self.images.take(self.batches[k]))


def default_workers(device="cuda") -> int:
    """Loader processes when not configured: on a GPU half the cores (the rest feed the device), at most 8;
    on the CPU none (training there uses every core, and a reader process would only take cores from it)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return max(0, min(8, usable_cpus() // 2)) if kind == "cuda" else 0


def batches(images: Images, index_batches: Sequence[np.ndarray], device, workers: int = 0) -> Iterator:
    """Each batch's uint8 images (b, s, s), in order: indexed on the device (resident) or read by a loader (streamed).

    Streamed batches come through pinned memory on CUDA and are moved with ``non_blocking`` by the caller
    (``train.to_input``); ``workers`` processes read ahead (0: read in this process).
    """
    images = as_images(images)
    if isinstance(images, ResidentImages):
        for idx in index_batches:
            yield images.take(idx)
        return
    import torch
    from torch.utils.data import DataLoader

    workers = min(workers, len(index_batches))
    loader = DataLoader(
        _Batches(images, list(index_batches)),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        generator=torch.Generator(),  # its own: a loader seeds its workers from torch's global RNG otherwise, which dropout draws from
    )
    yield from loader


def sequential(n: int, batch_size: int) -> list[np.ndarray]:
    """Index batches 0..n-1 in order (prediction and evaluation)."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
