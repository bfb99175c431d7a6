"""Run the pending blocks of a prediction: in this process, or on a Dask distributed cluster.

Both executors run the same per-block code (``joenet.predict.work_units``), so they write the same
bytes. The local one reads the next block and writes the previous one in threads while the
current one is predicted.

Scaling out with Dask (untested on GPUs here; the CPU path is what the tests run):

* one node, several GPUs: one worker per GPU, each seeing one device::

      for i in 0 1 2 3; do
          CUDA_VISIBLE_DEVICES=$i dask worker tcp://scheduler:8786 --nworkers 1 --nthreads 1 &
      done
      python -m joenet.predict ... executor=dask scheduler_address=tcp://scheduler:8786

  (start the scheduler first with ``dask scheduler``); ``device=auto`` picks ``cuda:0``, which is
  the worker's own GPU.

* SLURM with dask-jobqueue (``pip install dask-jobqueue``)::

      from dask_jobqueue import SLURMCluster
      from distributed import Client
      from joenet.predict import predict_volume

      cluster = SLURMCluster(
          queue="gpu", cores=8, processes=1, memory="32GB", walltime="04:00:00",
          job_extra_directives=["--gres=gpu:1"],
      )
      cluster.scale(jobs=8)  # 8 GPU jobs, one worker each
      predict_volume(ckpt_path="best.ckpt", input="cell.zarr", output="/shared/pred.zarr",
                     executor="dask", scheduler_address=cluster.scheduler_address)

  Input, output and checkpoint must be on a file system that every worker sees. A job that is
  killed loses only its unfinished blocks: run the same command again to finish them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from tqdm.auto import tqdm

from joenet.predict import work_units as block_ops
from joenet.predict import worker
from joenet.predict.input_image import open_input
from joenet.predict.work_units import Block, BlockJob
from joenet.predict.writer import CompletionRecord


def _progress(total: int, done: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=done, unit="block", desc="predict", disable=not enabled)


def run_local(
    job: BlockJob,
    pending: Sequence[Block],
    total: int,
    progress: bool = True,
    after_write: Callable[[Block, np.ndarray], None] | None = None,
) -> None:
    """Predict ``pending`` blocks one after another in this process.

    Args:
        job: the prediction's settings.
        pending: blocks without a completion record.
        total: all blocks of the prediction (for the progress bar).
        progress: show a tqdm bar (blocks done, ETA).
        after_write: called in the writer thread with each whole block's values once they are
            written, before the block is marked done (the viewer levels, overlapped with the
            next block's prediction).
    """
    if not pending:
        return
    image = open_input(job.input_path)
    group = zarr.open_group(job.output_path, mode="r+")
    record = CompletionRecord(job.output_path)
    predictor = worker.make_predictor(job)

    def write(block: Block, values: np.ndarray) -> None:
        block_ops.write_block(group, job, block, values)
        if block_ops.is_whole(job, block):  # only after all of the block's chunks are written
            if after_write is not None:
                after_write(block, values)
            record.mark_done(block.index)

    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=1) as writer,
        _progress(total, total - len(pending), progress) as bar,
    ):
        # Block i + 1 is read and block i - 1 written (zarr's decompression, compression and
        # file I/O release the GIL) while block i is predicted: at most three blocks in memory.
        future = reader.submit(block_ops.read_block, job, image, pending[0])
        written = None
        for i, block in enumerate(pending):
            inputs = future.result()
            if i + 1 < len(pending):
                future = reader.submit(block_ops.read_block, job, image, pending[i + 1])
            values = block_ops.compute_block(job, predictor, inputs)
            if written is not None:
                written.result()  # raises the writer's error; keeps one write in flight
                bar.update()
            written = writer.submit(write, block, values)
        assert written is not None  # pending is not empty
        written.result()
        bar.update()


def run_dask(
    job: BlockJob,
    pending: Sequence[Block],
    total: int,
    n_workers: int = 2,
    scheduler_address: str | None = None,
    progress: bool = True,
    task: Callable[[BlockJob, Block], object] = worker.process_block,
) -> None:
    """Predict ``pending`` blocks as Dask tasks; each worker writes its blocks itself.

    Args:
        job: the prediction's settings.
        pending: blocks without a completion record.
        total: all blocks of the prediction (for the progress bar).
        n_workers: worker processes of the ``LocalCluster`` (ignored with ``scheduler_address``).
        scheduler_address: an existing cluster's scheduler (e.g. a dask-jobqueue SLURMCluster's);
            None starts a ``LocalCluster`` of single-threaded worker processes.
        progress: show a tqdm bar (blocks done, ETA).
        task: the per-block function (tests swap it).
    """
    if not pending:
        return
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError(
            "executor=dask needs Dask's distributed scheduler: pip install 'joenet[dask]'"
        ) from None

    cluster = None
    if scheduler_address is None:
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    try:
        with (
            Client(scheduler_address or cluster) as client,
            _progress(total, total - len(pending), progress) as bar,
        ):
            futures = client.map(task, [job] * len(pending), list(pending), pure=False)
            for future in as_completed(futures):
                future.result()  # re-raises a worker's error here
                bar.update()
    finally:
        if cluster is not None:
            cluster.close()
