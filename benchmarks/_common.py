"""Shared helpers of the benchmark scripts: machine description, corpus lookup, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sharedctx.config import POLICIES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`: use this checkout's sharedctx
    sys.path.insert(0, str(ROOT))
#: environment variable naming the corpus folder when ``--data`` is not given
DATA_ENV = "SHAREDCTX_DATA"
#: the corpus beside a checkout (books/, code/, math/), read when neither ``--data`` nor $SHAREDCTX_DATA names one
NEIGHBOUR_DATA = ROOT.parent / "shared" / "data"
#: opening chapters of three novels shipped with the project (benchmarks/data/README.md): what ``--quick`` reads
SHIPPED_DATA = ROOT / "benchmarks" / "data"
#: haystack prose of the needle tasks, under the corpus folder
FILLER = "books/northanger_abbey.txt"


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine skews absolute times; ratios within one run are what to compare
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    import sharedctx

    info["sharedctx"] = sharedctx.__version__
    return info


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or None outside git."""
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write ``payload`` with the command, machine and date to ``out/name.json`` (``benchmarks/results`` by default)."""
    folder = Path(out) if out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(), "date": time.strftime("%Y-%m-%d"), "git": git_commit(), **payload}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------- the corpus
class MissingData(FileNotFoundError):
    """A text a benchmark reads is not there; the message names it and the ways to give the corpus."""


def add_data_arg(ap) -> None:
    """``--data DIR``: the corpus folder every benchmark reads its texts from (`data_root`)."""
    ap.add_argument("--data", metavar="DIR", default=None,
                    help=f"corpus folder with books/, code/, math/ as in ../shared/data (default: ${DATA_ENV}, else ../shared/data "
                         "beside the checkout; with --quick: the short texts shipped in benchmarks/data)")


def data_root(args) -> tuple[Path, str]:
    """The corpus folder a run reads and why: ``--data DIR``, else the shipped texts for ``--quick`` (a smoke run reads
    the same texts on every machine), else $SHAREDCTX_DATA, else ../shared/data beside the checkout."""
    if getattr(args, "data", None):
        return Path(args.data).expanduser(), "given by --data"
    if getattr(args, "quick", False):
        return SHIPPED_DATA, "--quick reads the texts shipped in benchmarks/data"
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser(), f"given by ${DATA_ENV}"
    return NEIGHBOUR_DATA, f"../shared/data beside the checkout, as neither --data nor ${DATA_ENV} is set"


def data_file(name: str | os.PathLike, args) -> Path:
    """``name`` under the corpus folder of `data_root` (e.g. ``books/emma.txt``), else ``name`` as a path to a file.

    Raises `MissingData` naming the file, the folder looked in and how to give the corpus."""
    root, why = data_root(args)
    if (root / name).is_file():
        return root / name
    if Path(name).expanduser().is_file():
        return Path(name).expanduser()
    missing = "" if root.is_dir() else "no such folder; "
    quick = getattr(args, "quick", False)  # --quick reads $SHAREDCTX_DATA only through --data
    ways = "--data DIR" if quick else f"--data DIR or {DATA_ENV}=DIR"
    hint = "" if quick else "; or run with --quick on the short texts shipped in benchmarks/data"
    raise MissingData(f"{name}: no such file in the benchmark corpus {root} ({missing}{why}), nor is it a path to a file. Give the "
                      f"corpus folder (books/, code/, math/ as in ../shared/data) with {ways}, or a path to the file{hint}")


def run(main) -> None:
    """Run a benchmark's ``main`` as a script: a missing corpus file ends it with its message instead of a traceback."""
    try:
        main()
    except MissingData as exc:
        raise SystemExit(f"error: {exc}") from None


# ---------------------------------------------------------------------- shared by the issue-6 benchmarks
def add_model_args(ap, *, lengths: list[int]) -> None:  # noqa: D401
    """Options every benchmark takes: model, adapter, sizes, threads, output folder, corpus folder, --quick."""
    ap.add_argument("--model", default=None, help="base model folder or id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="adapter folder; 'none' for the identity adapter (default: the shipped one, if any)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, metavar="N", help=f"context lengths in tokens (default {lengths}; smaller with --quick)")
    ap.add_argument("--chunk-size", type=int, default=None, help="override the chunk size C (tiny models in tests)")
    ap.add_argument("--policy", default=None, choices=POLICIES, help="walk policy (default: the adapter's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for JSON and PNG (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one trial: a smoke run of a few minutes")
    ap.add_argument("--name", default=None, help="output name instead of the benchmark's (e.g. finding_16k); report.py reads <benchmark>*.json")
    add_data_arg(ap)


def load_llm(args, **config_changes):
    """The SharedLLM a benchmark measures, from ``--model``, ``--adapter`` and ``--chunk-size``, with ``config_changes``.

    A change of ``injection_layers`` (M) away from the adapter's needs another adapter: the identity one is used
    and `model_info` records ``adapter.path = None``."""
    import json as _json

    from sharedctx import SharedCtxConfig, SharedLLM
    from sharedctx.model import ADAPTER_CONFIG, default_adapter_path

    name = (args.adapter or "").lower()
    adapter_dir = None if name == "none" else (Path(args.adapter) if args.adapter else (default_adapter_path() if args.model is None else None))
    config = SharedCtxConfig.from_dict(_json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["config"]) if adapter_dir else SharedCtxConfig()
    changes = dict(config_changes)
    if args.chunk_size:
        changes["chunk_size"] = args.chunk_size
    if getattr(args, "policy", None):
        changes["policy"] = args.policy
    if changes.get("injection_layers", config.injection_layers) != config.injection_layers:
        adapter_dir = None
    config = config.replace(**changes)
    return SharedLLM.from_pretrained(args.model, adapter=adapter_dir if adapter_dir else False, config=config)


def portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as a committed result may name it: relative to the repository when inside it, under
    ``$SHAREDCTX_HOME`` for the converted model cache, else as given (a model id, or a folder the user named)."""
    if not path:
        return None if path is None else str(path)
    resolved = Path(path).resolve()
    root = Path(__file__).resolve().parents[1]
    if resolved.is_relative_to(root):
        return str(resolved.relative_to(root))
    home = Path(os.environ.get("SHAREDCTX_HOME") or Path.home() / ".cache" / "sharedctx").resolve()
    if resolved.is_relative_to(home):
        return "$SHAREDCTX_HOME/" + str(resolved.relative_to(home))
    return str(path)


def model_info(llm) -> dict:
    """What was measured: base model, adapter (and whether it is trained), configuration; paths as `portable_path`
    writes them, so no machine's folders reach a committed result."""
    cfg = llm.base.config
    return {
        "model": portable_path(getattr(cfg, "_name_or_path", "")) or "SmolLM2-135M-Instruct",
        "fingerprint": llm.fingerprint,
        "max_positions": llm.max_positions,
        "adapter": {
            "path": portable_path(llm.adapter_path),
            "trained": llm.adapter_trained,
            "sha256": adapter_sha256(llm.adapter_path),
            **_adapter_training(llm.adapter_path),
        },
        "config": llm.config.to_dict(),
    }


def adapter_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of an adapter's weights: names the adapter measured wherever its folder was copied."""
    weights = Path(path) / "adapter.safetensors" if path else None
    if weights is None or not weights.is_file():
        return None
    import hashlib

    return hashlib.sha256(weights.read_bytes()).hexdigest()


def _adapter_training(path: str | None) -> dict:
    """What the adapter's training wrote beside it (steps, note), so a result says which adapter it measured."""
    if not path:
        return {}
    for name in ("training_summary.json", "training_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except ValueError:
                continue
            info = {k: data[k] for k in ("steps", "step", "note", "tasks", "window", "context_chunks") if k in data}
            if name == "training_config.json" and "steps" in info:  # the recipe's plan; a time limit may stop it earlier
                info["planned_steps"] = info.pop("steps")
            return {"training": info, "training_source": name}
    return {}


def output_name(base: str, args) -> str:
    base = getattr(args, "name", None) or base
    return f"{base}_quick" if args.quick else base


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU, else resident set size sampled every 5 ms (minus the start,
    after glibc ``malloc_trim``), which misses allocations shorter than the sampling interval."""

    def __init__(self, device) -> None:
        self.cuda = str(device).startswith("cuda")
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import threading

        import psutil

        try:  # hand memory freed by earlier calls back to the OS, so that reusing it shows in the RSS again
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass
        proc = psutil.Process()
        self.start = proc.memory_info().rss
        self._peak = self.start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = (self._peak - self.start) / 2**20


def plt():
    """matplotlib.pyplot with a file backend, or None when matplotlib is missing (the JSON is still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:  # pragma: no cover
        return None
    return pyplot


def finish(name: str, result: dict, args, plot) -> dict:
    """Write ``result`` as JSON, draw ``plot(written_result, png_path)`` next to it, and return what was written."""
    path = write_json(output_name(name, args), result, args.out)
    written = json.loads(path.read_text())
    plot(written, path.with_suffix(".png"))
    print(f"wrote {path}")
    return written
