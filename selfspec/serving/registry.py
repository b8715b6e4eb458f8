"""Adapter registry: named adapters found in configured folders, plus promoted versions.

A name is a key, never a path: a request's model name is checked against a strict
pattern and looked up in a table built by scanning the configured folders, so
`../x` or `/etc/passwd` can only ever be "invalid" (400) or "unknown" (404).

Two sources:
- run adapters: every directory matched by `serve.adapter_dirs` (globs such as
  `runs/*/adapters`) that holds `adapter_config.json`, or its immediate subfolders
  that do, named by the directory's basename (training checkpoints excluded);
- promoted adapters: copies under `<registry_dir>/<name>/vK/` listed in
  `<registry_dir>/registry.json`, served as `name@vK`; `name` alone means the
  current version (a promoted name shadows a run adapter of the same name).

`selfspec promote ADAPTER` copies an adapter there only when its evaluation beats the
base on its domain's tasks (`serve.promote_*`); earlier versions stay for rollback.
The table is rescanned when older than `serve.registry_refresh_s`, and at once on an
unknown name, so a running server sees new promotions without a restart.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from selfspec.io import read_json, write_json

log = logging.getLogger(__name__)

BASE_MODEL = "base"  # the name of the base model, in requests and in eval's metrics.json
ADAPTER_FILE = "adapter_config.json"
INDEX_FILE = "registry.json"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
VERSIONED_RE = re.compile(rf"^({NAME_PATTERN})@v([1-9][0-9]{{0,5}})$")
# An unknown name triggers a rescan at most this often, so junk names cannot hammer the disk.
MIN_RESCAN_S = 0.5


class AdapterNameError(ValueError):
    """A model name that is not a valid adapter name (HTTP 400)."""


class UnknownAdapterError(LookupError):
    """A valid name that no adapter has (HTTP 404)."""


class PromotionError(RuntimeError):
    """Promotion cannot be decided: missing evaluation, unknown domain, bad name."""


@dataclass(frozen=True)
class Adapter:
    name: str  # the concrete name: "final" or "biomedical@v3"
    path: str  # absolute adapter directory
    source: str  # "run" or "registry"


def check_name(name: Any) -> str:
    """Return `name` if it is `NAME` or `NAME@vK`; raise AdapterNameError otherwise."""
    if not isinstance(name, str) or not (NAME_RE.match(name) or VERSIONED_RE.match(name)):
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}..."
        raise AdapterNameError(
            f"invalid model name '{shown}': use 'base', an adapter name (letters, digits, '.', '_', '-', "
            "starting with a letter or digit) or NAME@vK"
        )
    return name


def registry_dir_for(config) -> str:
    return config.serve.registry_dir or f"{config.runs_dir.rstrip('/')}/registry"


def is_checkpoint(folder: Path) -> bool:
    return folder.name.startswith("checkpoint")


def find_run_adapters(patterns: list[str]) -> dict[str, list[str]]:
    """Glob each pattern; a match is an adapter dir or a folder of them. Name -> paths."""
    found: dict[str, list[str]] = {}
    for pattern in patterns:
        for match in sorted(glob.glob(os.path.expanduser(pattern))):
            folder = Path(match)
            if (folder / ADAPTER_FILE).is_file():
                candidates = [folder]
            elif folder.is_dir():
                candidates = sorted(p for p in folder.iterdir() if (p / ADAPTER_FILE).is_file())
            else:
                continue
            for adapter in candidates:
                if is_checkpoint(adapter):
                    continue
                if not NAME_RE.match(adapter.name) or adapter.name == BASE_MODEL:
                    log.warning("adapter %s skipped: its folder name is not a valid model name", adapter)
                    continue
                paths = found.setdefault(adapter.name, [])
                resolved = str(adapter.resolve())
                if resolved not in paths:
                    paths.append(resolved)
    return found


def read_index(registry_dir: str | Path) -> dict[str, Any]:
    path = Path(registry_dir) / INDEX_FILE
    if not path.is_file():
        return {"format": 1, "adapters": {}}
    return read_json(path)


def promoted_adapters(registry_dir: str | Path) -> tuple[dict[str, Adapter], dict[str, str]]:
    """Versioned adapters listed in registry.json (`name@vK` -> Adapter) and aliases
    (`name` -> its current `name@vK`). Paths are built from validated names, never read."""
    root = Path(registry_dir)
    try:
        index = read_index(root)
    except (OSError, ValueError) as exc:
        log.warning("registry index %s unreadable: %s", root / INDEX_FILE, exc)
        return {}, {}
    table: dict[str, Adapter] = {}
    aliases: dict[str, str] = {}
    for name, entry in (index.get("adapters") or {}).items():
        if not NAME_RE.match(name):
            continue
        for record in entry.get("versions", []):
            version = record.get("version")
            folder = root / name / f"v{version}"
            if isinstance(version, int) and version > 0 and (folder / ADAPTER_FILE).is_file():
                table[f"{name}@v{version}"] = Adapter(f"{name}@v{version}", str(folder.resolve()), "registry")
        current = f"{name}@v{entry.get('current')}"
        if current in table:
            aliases[name] = current
    return table, aliases


@dataclass
class AdapterRegistry:
    """The table of servable adapters, rescanned as it ages. Thread-safe."""

    patterns: list[str]
    registry_dir: str | None = None
    refresh_s: float = 2.0
    _table: dict[str, Adapter] = field(default_factory=dict, repr=False)
    _aliases: dict[str, str] = field(default_factory=dict, repr=False)
    _conflicts: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _scanned_at: float = field(default=float("-inf"), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, config) -> "AdapterRegistry":
        return cls(list(config.serve.adapter_dirs), registry_dir_for(config), config.serve.registry_refresh_s)

    def scan(self) -> None:
        """Rebuild the table from disk."""
        table: dict[str, Adapter] = {}
        conflicts: dict[str, list[str]] = {}
        for name, paths in find_run_adapters(self.patterns).items():
            if len(paths) == 1:
                table[name] = Adapter(name, paths[0], "run")
            else:
                conflicts[name] = paths
        aliases: dict[str, str] = {}
        if self.registry_dir:
            promoted, aliases = promoted_adapters(self.registry_dir)
            table.update(promoted)
            for alias in aliases:
                table.pop(alias, None)
                conflicts.pop(alias, None)
        with self._lock:
            self._table, self._aliases, self._conflicts = table, aliases, conflicts
            self._scanned_at = time.monotonic()

    def _refresh(self, max_age: float) -> None:
        if time.monotonic() - self._scanned_at > max_age:
            self.scan()

    def adapters(self) -> list[Adapter]:
        """Every servable adapter (aliases not repeated), as on disk now."""
        self.scan()
        with self._lock:
            return list(self._table.values())

    def names(self) -> list[str]:
        """Every servable adapter name, current aliases included, sorted."""
        self._refresh(self.refresh_s)
        with self._lock:
            return sorted([*self._table, *self._aliases])

    def _lookup(self, name: str) -> Adapter | None:
        with self._lock:
            return self._table.get(self._aliases.get(name, name))

    def resolve(self, name: str) -> Adapter:
        """The adapter a request names (an alias gives its current version).

        Raises AdapterNameError for an invalid name, UnknownAdapterError for a valid
        name that is not (or not unambiguously) in the configured folders.
        """
        check_name(name)
        self._refresh(self.refresh_s)
        found = self._lookup(name)
        if found is None:
            self._refresh(MIN_RESCAN_S)
            found = self._lookup(name)
        if found is not None:
            return found
        with self._lock:
            clash = self._conflicts.get(name)
        if clash:
            raise UnknownAdapterError(
                f"model '{name}' is ambiguous: adapters in {len(clash)} folders share that name; "
                "rename one or promote one under a distinct name"
            )
        raise UnknownAdapterError(f"the model '{name}' does not exist")


# -- promotion -------------------------------------------------------------------
@dataclass(frozen=True)
class PromotionDecision:
    passed: bool
    model: str  # the adapter's name in metrics.json
    domain: str
    checks: list[dict[str, Any]]
    reasons: list[str]


def find_metrics(adapter: Path) -> Path:
    """`runs/<name>/eval/metrics.json` for `runs/<name>/[round-k/]adapters/<adapter>`."""
    for parent in list(adapter.parents)[1:3]:
        candidate = parent / "eval" / "metrics.json"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{adapter}: no evaluation found (looked for eval/metrics.json two and three levels up); "
        "run `selfspec eval` first"
    )


def model_key(metrics: dict[str, Any], adapter: Path) -> str:
    """The adapter's name in metrics.json: matched by path, else by folder name."""
    models = metrics.get("models") or {}
    for name, path in models.items():
        if path and Path(path).resolve() == adapter:
            return name
    if adapter.name in models and adapter.name != metrics.get("reference"):
        return adapter.name
    raise PromotionError(
        f"{adapter}: the evaluation has no results for this adapter (it evaluated: {', '.join(models) or 'nothing'})"
    )


def configured_domains(run_root: Path) -> list[str]:
    """Domains the run was specialized for, from its config.yaml: `generate.domain`, else
    the domains of its seed files."""
    from selfspec.seeds import SeedError, find_seed_file, load_seeds

    path = run_root / "config.yaml"
    if not path.is_file():
        return []
    generate = (yaml.safe_load(path.read_text()) or {}).get("generate") or {}
    if generate.get("domain"):
        return [str(generate["domain"])]
    domains = []
    for seed_file in generate.get("seeds") or []:
        try:
            domains.append(load_seeds(find_seed_file(seed_file)).domain)
        except SeedError:
            continue
    return sorted(set(domains))


def adapter_domain(adapter: Path, metrics: dict[str, Any], metrics_path: Path) -> str:
    """The domain `selfspec train` recorded in the adapter's selfspec.json; else the run's
    configured domain; else the only domain the evaluation covered."""
    card = adapter / "selfspec.json"
    recorded = read_json(card).get("domain") if card.is_file() else None
    if recorded and recorded != "mixed":
        return str(recorded)
    configured = configured_domains(metrics_path.parent.parent)
    if len(configured) == 1:
        return configured[0]
    evaluated = sorted({t["domain"] for t in (metrics.get("tasks") or {}).values()})
    if len(evaluated) == 1:
        return evaluated[0]
    raise PromotionError(
        f"cannot tell the adapter's domain: the run config names {configured or 'none'} and the "
        f"evaluation covered {evaluated or 'none'}; record it as 'domain' in the adapter's selfspec.json"
    )


def decide_promotion(metrics: dict[str, Any], model: str, domain: str, rule) -> PromotionDecision:
    """Apply the promotion rule (a ServeConfig's `promote_*` fields) to a metrics.json document.

    The adapter passes when, at every evaluated shot (or `promote_shot`), its domain average
    of `promote_metric` exceeds the base's by more than `promote_min_delta`, and, with
    `promote_require_ci`, each of the domain's tasks has a paired CI of the difference above 0.
    """
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    reference = metrics.get("reference")
    domains = metrics.get("domains") or {}
    if reference != BASE_MODEL or BASE_MODEL not in domains:
        return PromotionDecision(False, model, domain, [], ["the evaluation has no base model to compare with"])
    ours, base = domains.get(model, {}).get(domain), domains[BASE_MODEL].get(domain)
    if not ours or not base:
        return PromotionDecision(False, model, domain, [], [f"the evaluation has no '{domain}' tasks"])
    shots = [str(rule.promote_shot)] if rule.promote_shot is not None else sorted(ours, key=int)
    metric = rule.promote_metric
    for shot in shots:
        a, b = (ours.get(shot) or {}).get(metric), (base.get(shot) or {}).get(metric)
        if a is None or b is None:
            reasons.append(f"metric '{metric}' not reported for domain '{domain}' at {shot}-shot")
            continue
        delta = round(a - b, 6)
        passed = delta > rule.promote_min_delta
        checks.append({"shot": int(shot), "metric": metric, "adapter": a, "base": b, "delta": delta, "passed": passed})
        if not passed:
            reasons.append(
                f"{shot}-shot {domain} {metric}: adapter {a:.4f} vs base {b:.4f} "
                f"(delta {delta:+.4f}, needs > {rule.promote_min_delta:+.4f})"
            )
        if rule.promote_require_ci:
            reasons += _ci_reasons(metrics, model, domain, shot, metric, checks)
    return PromotionDecision(not reasons and bool(checks), model, domain, checks, reasons)


def _ci_reasons(metrics, model, domain, shot, metric, checks) -> list[str]:
    reasons = []
    for task, info in sorted((metrics.get("tasks") or {}).items()):
        if info.get("domain") != domain:
            continue
        name = info["metrics"][0] if metric == "primary" else metric
        if name not in info.get("metrics", []):
            continue
        diff = ((metrics.get("deltas") or {}).get(model, {}).get(task, {}).get(shot) or {}).get(name) or {}
        low = diff.get("ci_low")
        passed = low is not None and low > 0
        checks.append({"shot": int(shot), "task": task, "metric": name, "ci_low": low, "passed": passed})
        if not passed:
            reasons.append(f"{shot}-shot {task} {name}: paired CI lower bound {low} is not above 0")
    return reasons


@contextmanager
def registry_lock(root: Path) -> Iterator[None]:
    """One promotion at a time per registry (version numbers must not collide)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_version(root: Path, name: str, index: dict[str, Any]) -> int:
    listed = [v["version"] for v in index["adapters"].get(name, {}).get("versions", [])]
    # A folder left by a promotion that died before updating the index also takes a number.
    on_disk = [int(p.name[1:]) for p in (root / name).glob("v*") if p.name[1:].isdigit()]
    return 1 + max(listed + on_disk, default=0)


def register(adapter: Path, name: str, record: dict[str, Any], registry_dir: str | Path) -> dict[str, Any]:
    """Copy an adapter to `<registry>/<name>/vK/` with promotion.json, then list it as current."""
    root = Path(registry_dir)
    with registry_lock(root):
        index = read_index(root)
        version = next_version(root, name, index)
        record = {**record, "name": name, "version": version, "model": f"{name}@v{version}"}
        staging = root / name / f".staging-v{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for item in adapter.iterdir():  # the adapter's own files, not nested checkpoints
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        write_json(staging / "promotion.json", record)
        staging.rename(root / name / f"v{version}")
        entry = index["adapters"].setdefault(name, {"current": None, "versions": []})
        entry["versions"].append({k: record[k] for k in ("version", "promoted_at", "source", "domain")})
        entry["current"] = version
        write_json(root / INDEX_FILE, index)
    return record


def set_current(registry_dir: str | Path, name: str, version: int) -> None:
    """Roll `name` back (or forward) to an earlier promoted version."""
    root = Path(registry_dir)
    with registry_lock(root):
        index = read_index(root)
        entry = index["adapters"].get(name)
        if not entry or version not in [v["version"] for v in entry["versions"]]:
            raise PromotionError(f"'{name}@v{version}' was never promoted")
        entry["current"] = version
        write_json(root / INDEX_FILE, index)


def promote(adapter_dir: str, config, name: str | None = None) -> tuple[PromotionDecision, dict[str, Any] | None]:
    """Promote an adapter if its evaluation beats the base on its domain's tasks.

    Returns the decision and, when it passed, the promotion record (with `model`,
    the served `name@vK`). Raises FileNotFoundError or PromotionError when it cannot decide.
    """
    adapter = Path(adapter_dir).expanduser().resolve()
    if not (adapter / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter directory (no {ADAPTER_FILE})")
    metrics_path = find_metrics(adapter)
    metrics = read_json(metrics_path)
    model = model_key(metrics, adapter)
    domain = adapter_domain(adapter, metrics, metrics_path)
    target = name or domain
    if not NAME_RE.match(target) or target == BASE_MODEL:
        raise PromotionError(
            f"cannot register under '{target}': a name is letters, digits, '.', '_', '-' "
            "(starting with a letter or digit) and not 'base'"
        )
    decision = decide_promotion(metrics, model, domain, config.serve)
    if not decision.passed:
        return decision, None
    rule = {k: v for k, v in config.serve.model_dump().items() if k.startswith("promote_")}
    record = {
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(adapter),
        "domain": domain,
        "eval": str(metrics_path),
        "eval_model": model,
        "model_ref": metrics.get("model_ref"),
        "rule": rule,
        "checks": decision.checks,
    }
    return decision, register(adapter, target, record, registry_dir_for(config))


def cli_promote(config, args) -> int:
    """`selfspec promote ADAPTER [--name N]`: 0 promoted, 1 rejected by the rule, 2 error."""
    try:
        decision, record = promote(args.adapter, config, args.name)
    except PromotionError as exc:
        print(f"selfspec promote: error: {exc}", file=sys.stderr)
        return 2
    for check in decision.checks:
        print(" ".join(f"{k}={v}" for k, v in check.items()))
    if record is None:
        print(f"not promoted: '{decision.model}' does not beat the base on {decision.domain}:", file=sys.stderr)
        for reason in decision.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 1
    print(f"promoted {args.adapter} as {record['model']} (registry: {registry_dir_for(config)})")
    return 0


__all__ = [
    "Adapter",
    "AdapterNameError",
    "AdapterRegistry",
    "PromotionDecision",
    "PromotionError",
    "UnknownAdapterError",
    "check_name",
    "decide_promotion",
    "promote",
    "set_current",
]
