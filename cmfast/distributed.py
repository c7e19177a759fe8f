"""Sampling into a folder by one process or many (torch.distributed, as `torchrun` starts it), resumable.

The work is cut into batches of fixed sample indices: batch k holds samples k*B .. k*B + B - 1, and sample i's noise
and label come from its own generator seeded by (seed, i). A batch therefore computes the same numbers whichever
process runs it, and samples.npz is the same, bit for bit, whatever the number of processes and nodes (on the same
hardware and software) at a given batch size.

Each finished batch is a shard, written atomically to OUT/.cmfast-shards/ with a description of the job it belongs
to (the weights' checksum, seed, schedule, precision, batch, count, labels). Process 0 takes the folder (cmfast.outputs:
checked, locked against a second job, which is refused) and tells the others what is left to do: the batches with no
valid shard, dealt round-robin. A shard that does not read back (a torn or damaged file) is redone; one from another
job is refused (--force discards it). When every shard is there, process 0 assembles samples.npz and grid.png (moved
into place as a set) and removes the shards. A job stopped midway (^C, SIGTERM, a kill, a failed process) keeps its
finished shards; the same command, with any number of processes, completes it with the same result. A process that
fails makes every process raise, naming it; nothing is assembled then. No image passes through a collective: only
small status objects do.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import images, outputs, sampling, schedules
from .consistency import Denoiser

SHARDS = ".cmfast-shards"
OUTPUTS = ("samples.npz", "grid.png")


class JobFailed(RuntimeError):
    """A process of a sampling job failed; raised on every process, naming it."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def world(device_type: str | None = None):
    """This process's place (a World) for the length of a job: from an initialised torch.distributed (the caller's
    group, left as it is), else from torchrun's environment, else a world of one. From torchrun's environment the
    process group is initialised here (NCCL for CUDA, gloo for the CPU) and destroyed at the end: a process that
    exits with a live gloo group can abort in its teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if not dist.is_available() or (not dist.is_initialized() and size == 1):
        yield World()
        return
    if dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), local_rank)
        return
    cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda:  # NCCL's collectives (the status objects included) go through the current GPU: this process's own
        torch.cuda.set_device(local_rank)
    # The processes meet only at the start and the end, and the end waits for the slowest one's share: a long
    # timeout, so that an uneven share is not taken for a hang (a process that dies ends the job through torchrun).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    try:
        yield World(dist.get_rank(), dist.get_world_size(), local_rank)
    finally:
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """The device of this process: with CUDA in a job of several processes, the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device


def _everyone(w: World, value) -> list:
    """value from every process, in rank order (small Python objects only)."""
    if w.size == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * w.size
    dist.all_gather_object(gathered, value)
    return gathered


def _from_main(w: World, value):
    """Process 0's value, on every process."""
    if w.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def weights_checksum(unet: torch.nn.Module) -> str:
    """A checksum of every parameter and buffer, by name: what says two jobs sample the same model."""
    crc = 0
    for name, value in sorted(unet.state_dict().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return f"{crc:08x}"


def _shard_name(k: int) -> str:
    return f"shard-{k:07d}.npz"


def _read_shard(path: Path, job: dict, count: int):
    """("ok", images, labels) for a valid shard, ("other", its job) for another job's, None if it does not read back."""
    try:
        with np.load(path, allow_pickle=False) as f:
            recorded = json.loads(str(f["job"]))
            if recorded != job:
                return "other", recorded
            arr = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except Exception:  # torn, truncated, not an npz
        return None
    if arr.dtype != np.uint8 or arr.shape[0] != count or (labels is not None and labels.shape != (count,)):
        return None
    return "ok", arr, labels


def _differences(a: dict, b: dict) -> str:
    return ", ".join(f"{k} {b.get(k)!r} here, {a.get(k)!r} asked" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class Progress:
    """One bar for the whole job on process 0: images in finished shards (every process's) of the total."""

    def __init__(self, w: World, total: int, done: int, desc: str, shards: Path, enabled: bool):
        from tqdm.auto import tqdm

        self.shards, self.total = shards, total
        self.bar = tqdm(total=total, initial=done, unit="img", desc=desc, disable=not (enabled and w.main))
        self.counted = done

    def refresh(self, batch: int) -> None:
        """After each of process 0's batches: the shards every process has finished by now."""
        done = min(self.total, sum(1 for _ in self.shards.glob("shard-*.npz")) * batch)
        self.bar.update(max(0, done - self.counted))
        self.counted = max(self.counted, done)

    def finish(self) -> None:
        self.bar.update(self.total - self.counted)
        self.counted = self.total
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def sample_to_folder(model, out, *, num: int, batch: int, seed: int = 0, sigmas=None, class_labels=None,
                     force: bool = False, cuda_graph: bool = False, progress: bool = True) -> Path | None:
    """Sample `num` images of `model` (a cmfast.pretrained.Model: the U-Net on this process's device, its kind) into
    `out`: samples.npz (arr_0 uint8 NHWC, arr_1 labels for class-conditional models) and grid.png. sigmas: the
    consistency levels (default one step from 80), or for an EDM teacher the Heun grid (default 40 Karras levels).
    class_labels: a list cycled over the samples, or None to draw one per sample from its generator.
    Run by every process of a torch.distributed job (or alone); returns the samples.npz path on process 0, None on
    the others. Raises on every process if any process fails (naming it); finished shards stay for a rerun."""
    if not (isinstance(num, int) and isinstance(batch, int) and num >= 1 and batch >= 1):
        raise ValueError(f"num and batch: expected positive counts, got {num!r} and {batch!r}")
    out = Path(out)
    if sigmas is None:
        sigmas = schedules.karras_sigmas(40) if model.kind == "edm" else [sampling.SIGMA_MAX]
    levels = sampling.noise_levels(sigmas)
    job = {"weights": weights_checksum(model.unet), "kind": model.kind, "seed": seed,
           "sigmas": [float(s) for s in levels], "precision": model.unet.precision, "batch": batch, "num": num,
           "class_labels": list(class_labels) if class_labels else None}
    batches = math.ceil(num / batch)
    shards = out / SHARDS

    with contextlib.ExitStack() as stack:
        w = stack.enter_context(world(model.unet.device.type))
        folder, plan, refused = None, None, None
        if w.main:  # takes the folder for the whole job; the other processes write only their shards into it
            try:
                folder = stack.enter_context(outputs.Outputs(out, OUTPUTS, replace="own" if force else False))
                plan = {"todo": _plan(shards, job, num, batch, batches, force)}
            except (ValueError, OSError) as e:
                refused = e
                plan = {"error": str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"}
        plan = _from_main(w, plan)
        if "error" in plan:
            raise refused if refused is not None else outputs.OutputError(plan["error"])
        done = min(num, (batches - len(plan["todo"])) * batch)
        bar = stack.enter_context(Progress(w, num, done, _describe(model, levels), shards, progress))
        status, error = _run_share(model, plan["todo"][w.rank::w.size], levels, seed, class_labels, cuda_graph, job,
                            num, batch, shards, bar, w)
        reports = _everyone(w, status)  # every process waits here for every other, failed or not
        failed = [r for r in reports if not r["ok"]]
        if failed and w.size == 1:
            raise error
        if failed:
            raise JobFailed("; ".join(f"process {r['rank']} of {w.size} failed: {r['error']}" for r in failed)
                               + f" (finished shards are kept in {shards}; run the same command again to complete)")
        bar.finish()
        if not w.main:
            return None
        _assemble(folder, shards, job, num, batch, batches)
        _report(reports, num)
        return folder.path("samples.npz")


def _run_share(model, mine, levels, seed, class_labels, cuda_graph, job, num, batch, shards, bar, w):
    """This process's batches, each written as a shard: (its status for the exchange, the exception if it failed).
    A failure is reported to every process at the exchange instead of raised here, so that none waits for this one."""
    status = {"rank": w.rank, "ok": True, "images": 0, "seconds": 0.0}
    start = time.perf_counter()
    try:
        run = sampling.sample_heun if model.kind == "edm" else sampling.sample
        denoiser = Denoiser(model.unet, kind=model.kind, cuda_graph=cuda_graph)
        c, device = model.unet.config, model.unet.device
        for k in mine:
            indices = range(k * batch, min((k + 1) * batch, num))
            gens = sampling.generators_for(seed, indices)
            y = sampling.labels_for(c.num_classes, indices, gens, class_labels, device)
            x = levels[0] * sampling.randn((len(indices), c.in_channels, c.image_size, c.image_size), gens, device)
            arr = images.to_uint8(run(denoiser, x, levels, y=y, generator=gens))
            _write_shard(shards / _shard_name(k), arr, None if y is None else y.cpu().numpy().astype(np.int64), job)
            status["images"] += len(indices)
            bar.refresh(batch)
    except Exception as e:
        status.update(ok=False, error=f"{type(e).__name__}: {e}")
        status["seconds"] = time.perf_counter() - start
        return status, e
    status["seconds"] = time.perf_counter() - start
    return status, None


def _describe(model, levels) -> str:
    calls = 2 * len(levels) - 1 if model.kind == "edm" else len(levels)
    return f"sampling {model.name}, {calls} network call{'s' if calls > 1 else ''} an image"


def _plan(shards: Path, job: dict, num: int, batch: int, batches: int, force: bool) -> list[int]:
    """The batches with no valid shard; refuses shards of another job (unless force: they are removed)."""
    shards.mkdir(exist_ok=True)
    for leftover in shards.glob(f"{outputs.PART}*"):  # temporaries of a killed run (the folder is locked: no writer)
        leftover.unlink(missing_ok=True)
    todo = []
    for k in range(batches):
        path = shards / _shard_name(k)
        if not path.exists():
            todo.append(k)
            continue
        got = _read_shard(path, job, min(batch, num - k * batch))
        if got is not None and got[0] == "other":
            if not force:
                raise outputs.OutputExists(
                    f"--out {shards.parent}: holds shards of another sampling job ({_differences(job, got[1])}); "
                    "run that job's command to finish it, choose another folder, or --force to discard them")
            got = None
        if got is None:  # damaged, or discarded: redone
            path.unlink()
            todo.append(k)
    extra = [p for p in shards.glob("shard-*.npz") if not p.name[6:13].isdigit() or int(p.name[6:13]) >= batches]
    for path in extra:  # a job of more samples; refused above unless it matched, which it cannot (num differs)
        path.unlink()
    return todo


def _write_shard(path: Path, arr, labels, job: dict) -> None:
    tmp = path.with_name(f"{outputs.PART}{os.getpid()}-{path.name}")
    try:
        arrays = {"arr_0": arr, "job": np.array(json.dumps(job, sort_keys=True))}
        if labels is not None:
            arrays["arr_1"] = labels
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _assemble(folder: outputs.Outputs, shards: Path, job: dict, num: int, batch: int, batches: int) -> None:
    parts, labels = [], []
    for k in range(batches):
        got = _read_shard(shards / _shard_name(k), job, min(batch, num - k * batch))
        if got is None or got[0] != "ok":
            raise JobFailed(f"{shards / _shard_name(k)}: missing or damaged after every process finished; run the "
                            "same command again to redo it")
        parts.append(got[1])
        if got[2] is not None:
            labels.append(got[2])
    arr = np.concatenate(parts)
    images.save_npz(folder.stage("samples.npz"), arr, np.concatenate(labels) if labels else None)
    images.save_png(folder.stage("grid.png"), images.grid(arr))
    folder.commit(drop=[SHARDS])  # the shards go with the commit: a kill after its journal still removes them


def _report(reports: list[dict], num: int) -> None:
    total = max(r["seconds"] for r in reports) or float("nan")
    if len(reports) > 1:
        each = ", ".join(f"{r['rank']}: {r['images'] / r['seconds']:.1f}" if r["seconds"] else f"{r['rank']}: -"
                         for r in reports)
        print(f"{num} images in {total:.1f} s by {len(reports)} processes: {sum(r['images'] for r in reports) / total:.1f} "
              f"images/s in all (per process, images/s: {each})")
