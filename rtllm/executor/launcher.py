"""Ranks started by an external launcher: torchrun (or mpirun / SLURM wrappers that set the same
torch.distributed variables), one process per GPU, on one node or many.

Every process of the launch runs the user's script. When that script builds an engine split across
ranks (``LLM(model, tensor_parallel_size=..., pipeline_parallel_size=...)``, tp * pp equal to the
launch's WORLD_SIZE), the processes take their rank from the environment instead of the executor
spawning them:

- RANK 0 is the driver: its executor spawns one worker process, rank 0 of the group (it inherits
  the launch's variables and joins with ``env://``), which schedules and runs its slice; the script
  goes on to submit requests as usual.
- every other RANK builds its slice of the engine inside ``LLM()`` (its GPU: LOCAL_RANK), joins the
  group and follows rank 0's steps until rank 0 shuts down; then the process exits with status 0
  (SystemExit), so the rest of the script runs on rank 0 only. A failure exits with status 1 and
  the launcher stops the others (torchrun does).

A launch whose WORLD_SIZE differs from tp * pp is a ConfigError naming both; a script that builds
an unsplit engine under a launcher (data parallel: one engine per process) is not affected.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rtllm.config import EngineConfig
from rtllm.errors import ConfigError

logger = logging.getLogger(__name__)

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchedRank:
    rank: int
    world_size: int
    local_rank: int


def launched_rank(environ: dict | None = None) -> LaunchedRank | None:
    """This process's place in an external launch (the torch.distributed env variables), or None."""
    env = os.environ if environ is None else environ
    if not all(env.get(k) for k in LAUNCH_ENV):
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ConfigError(f"launcher environment: RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    if world < 2:
        return None
    if not 0 <= rank < world:
        raise ConfigError(f"launcher environment: RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    return LaunchedRank(rank, world, local)


def launch_for(engine_config: EngineConfig) -> LaunchedRank | None:
    """The launch this engine joins: set only when the engine is split across ranks under a launcher."""
    mapping = engine_config.mapping
    if mapping is None or mapping.world_size == 1:
        return None
    launch = launched_rank()
    if launch is None:
        return None
    if launch.world_size != mapping.world_size:
        raise ConfigError(f"the launcher started WORLD_SIZE={launch.world_size} processes, but the engine is split "
                          f"across tp_size * pp_size = {mapping.tp_size} * {mapping.pp_size} = {mapping.world_size} "
                          f"ranks: launch tp * pp processes (e.g. torchrun --nproc-per-node {mapping.world_size})")
    return launch


def follow_launched(engine_config: EngineConfig, launch: LaunchedRank) -> None:
    """A launched rank other than 0: serve rank 0's engine, then end the process (never returns)."""
    from rtllm.executor.messages import WorkerConfig
    from rtllm.executor.worker import follow_rank

    logger.info("launched rank %d of %d (local rank %d): following rank 0's engine", launch.rank,
                launch.world_size, launch.local_rank)
    cfg = WorkerConfig(engine_config, input_addr=None, output_addr=None, rank=launch.rank,
                       dist_init_method="env://", local_rank=launch.local_rank)
    raise SystemExit(follow_rank(cfg))
