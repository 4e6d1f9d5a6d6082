"""Mapping: which part of the model a rank holds (TensorRT-LLM's name and rank layout).

Ranks are laid out tensor-parallel fastest: rank = pp_rank * tp_size + tp_rank, so the ranks of one
pipeline stage form a tensor-parallel group (consecutive ranks: one node's GPUs), and the ranks with
the same tp_rank form a pipeline group. Inside a tensor-parallel group, MoE layers split again:
moe_tp_size * moe_ep_size == tp_size, expert-parallel fastest (moe_ep_rank = tp_rank % moe_ep_size).

Everything is checked when a Mapping is built (products, rank range) and, against a model, by
``validate_for(model_config)`` (heads, KV heads, layers, experts); each failure is a ConfigError
whose message names the rule.
"""

from __future__ import annotations

from rtllm.errors import ConfigError


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Mapping.{name}={value!r}: must be a positive integer")
    return value


class Mapping:
    """world_size = tp_size * pp_size ranks; ``rank`` is this process's (0 in a single process)."""

    def __init__(self, world_size: int = 1, tp_size: int = 1, pp_size: int = 1, moe_tp_size: int | None = None,
                 moe_ep_size: int | None = None, rank: int = 0) -> None:
        self.world_size = _positive_int("world_size", world_size)
        self.tp_size = _positive_int("tp_size", tp_size)
        self.pp_size = _positive_int("pp_size", pp_size)
        if tp_size * pp_size != world_size:
            raise ConfigError(f"Mapping: tp_size * pp_size must equal world_size, got tp_size={tp_size} * "
                              f"pp_size={pp_size} = {tp_size * pp_size} != world_size={world_size}")
        if moe_tp_size is None and moe_ep_size is None:
            moe_tp_size, moe_ep_size = tp_size, 1
        elif moe_ep_size is None:
            moe_ep_size = tp_size // _positive_int("moe_tp_size", moe_tp_size) or 1
        elif moe_tp_size is None:
            moe_tp_size = tp_size // _positive_int("moe_ep_size", moe_ep_size) or 1
        self.moe_tp_size = _positive_int("moe_tp_size", moe_tp_size)
        self.moe_ep_size = _positive_int("moe_ep_size", moe_ep_size)
        if self.moe_tp_size * self.moe_ep_size != tp_size:
            raise ConfigError(f"Mapping: moe_tp_size * moe_ep_size must equal tp_size (MoE layers split the "
                              f"tensor-parallel group), got moe_tp_size={self.moe_tp_size} * moe_ep_size="
                              f"{self.moe_ep_size} != tp_size={tp_size}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"Mapping.rank={rank!r}: must be in 0..world_size-1 = 0..{world_size - 1}")
        self.rank = rank

    # -- this rank's coordinates ---------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank % self.moe_ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank // self.moe_ep_size

    @property
    def tp_group(self) -> list[int]:
        """The ranks of this pipeline stage (they split each layer)."""
        return [self.pp_rank * self.tp_size + i for i in range(self.tp_size)]

    @property
    def pp_group(self) -> list[int]:
        """The ranks holding the same tensor-parallel slice of every stage, first stage first."""
        return [self.tp_rank + i * self.tp_size for i in range(self.pp_size)]

    @property
    def moe_ep_group(self) -> list[int]:
        base = self.pp_rank * self.tp_size + self.moe_tp_rank * self.moe_ep_size
        return [base + i for i in range(self.moe_ep_size)]

    @property
    def moe_tp_group(self) -> list[int]:
        base = self.pp_rank * self.tp_size + self.moe_ep_rank
        return [base + i * self.moe_ep_size for i in range(self.moe_tp_size)]

    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group of the world (to create process groups in the same order everywhere)."""
        return [[p * self.tp_size + t for t in range(self.tp_size)] for p in range(self.pp_size)]

    def pp_groups(self) -> list[list[int]]:
        return [[t + p * self.tp_size for p in range(self.pp_size)] for t in range(self.tp_size)]

    def has_tp(self) -> bool:
        return self.tp_size > 1

    def has_pp(self) -> bool:
        return self.pp_size > 1

    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def prev_pp_rank(self) -> int:
        """The rank that feeds this stage (wraps around: the last stage for the first)."""
        return (self.pp_rank - 1) % self.pp_size * self.tp_size + self.tp_rank

    def next_pp_rank(self) -> int:
        return (self.pp_rank + 1) % self.pp_size * self.tp_size + self.tp_rank

    def pp_layers(self, num_layers: int) -> range:
        """The decoder layers of this stage: contiguous, the first stages taking one more when uneven."""
        return self.pp_layers_of(self.pp_rank, num_layers)

    def pp_layers_of(self, pp_rank: int, num_layers: int) -> range:
        base, extra = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (pp_rank < extra))

    def with_rank(self, rank: int) -> Mapping:
        return Mapping(self.world_size, self.tp_size, self.pp_size, self.moe_tp_size, self.moe_ep_size, rank)

    # -- against a model -------------------------------------------------------------------------
    def kv_heads_per_rank(self, num_kv_heads: int) -> int:
        """KV heads a rank holds: a 1/tp share, or one replicated head when tp > num_kv_heads."""
        return max(num_kv_heads // self.tp_size, 1)

    def validate_for(self, config) -> None:
        """Check this mapping against a model config (rtllm.models.config.ModelConfig or anything with
        its field names); a ConfigError names the rule that fails."""
        tp, pp = self.tp_size, self.pp_size
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        arch = getattr(config, "architecture", "the model")
        if heads % tp:
            raise ConfigError(f"tp_size={tp} does not fit {arch}: num_attention_heads={heads} must be divisible "
                              f"by tp_size (each rank holds num_attention_heads / tp_size query heads)")
        if kv % tp and tp % kv:
            raise ConfigError(f"tp_size={tp} does not fit {arch}: num_key_value_heads={kv} must be divisible by "
                              f"tp_size, or tp_size divisible by num_key_value_heads (KV heads replicated)")
        inter = config.intermediate_size
        if inter % tp:
            raise ConfigError(f"tp_size={tp} does not fit {arch}: intermediate_size={inter} must be divisible "
                              f"by tp_size (each rank holds a 1/tp_size slice of the MLP)")
        layers = config.num_hidden_layers
        if layers < pp:
            raise ConfigError(f"pp_size={pp} does not fit {arch}: num_hidden_layers={layers} must be >= pp_size "
                              f"(every pipeline stage holds at least one layer)")
        experts = getattr(config, "num_experts", 0) or 0
        ep = self.moe_ep_size
        if ep > 1 and (ep > experts or experts % ep):
            raise ConfigError(f"moe_ep_size={ep} does not fit {arch}: num_experts={experts} must be divisible "
                              f"by moe_ep_size (each rank holds num_experts / moe_ep_size experts)")
        moe_inter = getattr(config, "moe_intermediate_size", 0) or 0
        if experts and moe_inter % self.moe_tp_size:
            raise ConfigError(f"moe_tp_size={self.moe_tp_size} does not fit {arch}: moe_intermediate_size="
                              f"{moe_inter} must be divisible by moe_tp_size")

    # -- value semantics ---------------------------------------------------------------------------
    def _key(self) -> tuple:
        return (self.world_size, self.tp_size, self.pp_size, self.moe_tp_size, self.moe_ep_size, self.rank)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Mapping(world_size={self.world_size}, tp_size={self.tp_size}, pp_size={self.pp_size}, "
                f"moe_tp_size={self.moe_tp_size}, moe_ep_size={self.moe_ep_size}, rank={self.rank})")
