"""Benchmark labelless.kmeans1d: SSE against the exact optimum, speed on VGG-16, scikit-learn.

Three measurements, written as JSON and printed as markdown tables:

* quality: on REAL trained layer weights (torchvision resnet18, 1 channel, 32 px, trained here
  on Fashion-MNIST for a few hundred SGD steps and cached under ``bench/.cache/``; or any
  safetensors state_dict with ``--weights``/``--model``), our SSE over the exact optimum of
  Wang & Song's dynamic programme (``ckwrap``, or the ``kmeans1d`` package) at k = 2..256.
  The exact programme costs time and memory in proportion to values x clusters (~16 bytes
  each), so a (tensor, k) pair is measured only when that product is within ``--budget``;
* speed: every Conv/Linear weight of torchvision ``vgg16()`` (138,344,128 values) at k = 256,
  through the public API (int64 indices) and through ``cluster(..., np.uint8)`` (what
  ``quantize`` uses), after warming numba up; the compile time is measured apart;
* scikit-learn: ``KMeans(n_clusters=k, n_init=1)`` on a few real tensors: time and SSE ratios.

    .venv/bin/python bench/kmeans.py            # full run: ~8 minutes on 2 cores once trained
    .venv/bin/python bench/kmeans.py --quick    # smoke run: ~1 minute once its weights are cached
    .venv/bin/python bench/kmeans.py --weights resnet50.safetensors --model resnet50

Training the resnet18 (250 steps of 16 images) took 19 minutes on the 2 shared cores at load
average ~8; it is done once and cached.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import labelless
from labelless.io import atomic_write_json
from labelless.kmeans import cluster

HERE = Path(__file__).resolve().parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
RESNET_SPEC = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True)
KS = (2, 4, 16, 32, 256)
SPEED_K = 256
SKLEARN_KS = (16, 256)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_probe:
        compile_probe()
        return 0
    torch.manual_seed(0)
    result: dict = {"machine": machine(), "date": datetime.date.today().isoformat(), "quick": args.quick}
    started = time.perf_counter()
    warm_up()  # kernels come from numba's on-disk cache (compiled on the first ever run)
    first_call = time.perf_counter() - started
    tensors, result["weights"] = real_weights(args)
    result["speed"] = speed(args, first_call)  # timings first, the slow exact reference last
    result["sklearn"] = versus_sklearn(tensors, args)
    result["quality"] = quality(tensors, args)
    add_optimum(result["sklearn"], result["quality"]["rows"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(markdown(result))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few tensors, one timing repeat")
    parser.add_argument("--out", default=str(HERE / "results" / "kmeans.json"), help="JSON results file")
    parser.add_argument("--weights", help="safetensors state_dict of real weights (needs --model)")
    parser.add_argument("--model", help="torchvision model name of --weights, e.g. resnet50")
    parser.add_argument("--cache", default=str(HERE / ".cache"), help="where trained weights are kept")
    parser.add_argument("--train-steps", type=int, default=250, help="SGD steps of the resnet18")
    parser.add_argument("--batch", type=int, default=16, help="training batch size")
    parser.add_argument("--budget", type=float, default=8e7, help="max values x k for the exact reference")
    parser.add_argument("--reference", choices=("ckwrap", "kmeans1d"), default="ckwrap")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the VGG-16 set")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if bool(args.weights) != bool(args.model):
        parser.error("--weights and --model go together")
    if args.quick:
        args.budget, args.repeats = min(args.budget, 1e7), 1
    return args


def machine() -> dict:
    """CPU model, cores, RAM, library versions: what the timings depend on."""
    cpu = _proc_field("/proc/cpuinfo", ("model name", "cpu family", "model"))
    mem_kb = float(_proc_field("/proc/meminfo", ("MemTotal",))["MemTotal"].split()[0])
    import numba
    import sklearn

    return {
        "cpu": f"{cpu.get('model name', platform.processor())} "
               f"(family {cpu.get('cpu family')}, model {cpu.get('model')})",
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "numba": numba.__version__, "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__, "labelless": labelless.__version__},
    }


def _proc_field(path: str, names: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names and key.strip() not in found:
            found[key.strip()] = value.strip()
    return found


# -- real weights ------------------------------------------------------------------------


def real_weights(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict]:
    """Conv/Linear weight tensors by name (in module order), and where they came from."""
    if args.weights:
        state = labelless.load_state_dict_file(args.weights)
        with torch.device("meta"):  # only the module names are needed
            model = torchvision.models.get_model(args.model, weights=None)
        return layer_weights(model, state), {"source": args.weights, "model": args.model}
    state, info = trained_resnet18(Path(args.cache), 20 if args.quick else args.train_steps, args.batch)
    return layer_weights(labelless.build_model(RESNET_SPEC, device="meta"), state), info


def layer_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight of every Conv and Linear module of ``model``, taken from ``state``."""
    layers = (nn.modules.conv._ConvNd, nn.Linear)
    names = [f"{fqn}.weight" for fqn, m in model.named_modules() if isinstance(m, layers)]
    missing = [name for name in names if name not in state]
    if missing:
        raise SystemExit(f"the weights lack {len(missing)} layer(s) of the model, e.g. {missing[0]}")
    return {name: state[name].float().contiguous() for name in names}


def trained_resnet18(cache: Path, steps: int, batch: int) -> tuple[dict[str, torch.Tensor], dict]:
    """resnet18 trained on Fashion-MNIST for ``steps`` SGD steps; cached as safetensors."""
    path = cache / f"resnet18_fashion-mnist_{steps}x{batch}.safetensors"
    if path.is_file():
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        info = {"source": str(path), "cached": True, "train_seconds": float(meta["seconds"]), "steps": steps,
                "batch": batch, "test_accuracy_1000": float(meta["test_accuracy"])}
        return load_file(path), info
    torch.manual_seed(0)
    model = labelless.build_model(RESNET_SPEC)
    started = time.perf_counter()
    losses = train(model, *fashion_mnist("train"), steps, batch)
    seconds = time.perf_counter() - started
    accuracy = test_accuracy(model, *fashion_mnist("t10k"))
    cache.mkdir(parents=True, exist_ok=True)
    metadata = {"steps": str(steps), "batch": str(batch), "seconds": f"{seconds:.0f}",
                "test_accuracy": f"{accuracy:.4f}"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=metadata)
    info = {"source": str(path), "cached": False, "train_seconds": round(seconds, 1), "steps": steps,
            "batch": batch, "first_loss": losses[0], "last_loss": statistics.mean(losses[-20:]),
            "test_accuracy_1000": accuracy}
    print(f"trained resnet18: {info}", file=sys.stderr)
    return model.state_dict(), info


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) normalised, zero-padded from 28 px, and labels (N,)."""
    images = _read_idx(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
    labels = _read_idx(FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz")
    x = (torch.from_numpy(images).float().div_(255) - FASHION_MEAN) / FASHION_STD
    pad = -FASHION_MEAN / FASHION_STD  # the normalised black background
    return F.pad(x.unsqueeze(1), (2, 2, 2, 2), value=pad), torch.from_numpy(labels).long()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]  # magic: 0, 0, dtype code (8 = uint8), number of dimensions
    shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int) -> list[float]:
    """Plain SGD with momentum on random mini-batches; returns the loss of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for step in range(steps):
        pick = torch.randint(len(images), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[pick]), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"  step {step}/{steps} loss {loss.item():.3f}", file=sys.stderr)
    return losses


@torch.no_grad()
def test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n: int = 1000) -> float:
    model.eval()
    predicted = torch.cat([model(chunk).argmax(1) for chunk in images[:n].split(250)])
    return float((predicted == labels[:n]).float().mean())


# -- quality: SSE over the exact optimum ---------------------------------------------------


def quality(tensors: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """SSE ratio to the optimum for every (tensor, k) within the reference's budget."""
    names = list(tensors)[:6] if args.quick else list(tensors)
    rows = []
    for name in names:
        values = tensors[name].reshape(-1).numpy()
        n_distinct = np.unique(values).size
        for k in KS:
            if values.size * k <= args.budget and k < n_distinct:
                rows.append(quality_row(name, values, k, args.reference))
    skipped = sorted({name for name in names if not any(r["tensor"] == name for r in rows if r["k"] == 256)})
    return {"reference": args.reference, "budget": args.budget, "rows": rows, "summary": summarise(rows),
            "no_reference_at_256": skipped}


def quality_row(name: str, values: np.ndarray, k: int, reference: str) -> dict:
    started = time.perf_counter()
    centroids, indices = cluster(values, k, None, np.int64)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    optimum = optimal_sse(values, k, reference)
    reference_seconds = time.perf_counter() - started
    ours = sse(values, centroids, indices)
    ratio = ours / optimum if optimum > 0 else (1.0 if ours == 0 else float("inf"))
    print(f"  {name} n={values.size} k={k}: {ratio:.6f} ({reference_seconds:.1f} s)", file=sys.stderr)
    return {"tensor": name, "n": int(values.size), "k": k, "sse": ours, "optimal_sse": optimum, "ratio": ratio,
            "seconds": ours_seconds, "reference_seconds": reference_seconds}


def optimal_sse(values: np.ndarray, k: int, reference: str) -> float:
    """The exact optimum of Wang & Song's dynamic programme, in float64."""
    x = values.astype(np.float64)
    if reference == "ckwrap":
        import ckwrap

        result = ckwrap.ckmeans(x, k)
        return sse(x, result.centers, result.labels)
    import kmeans1d

    labels, centers = kmeans1d.cluster(x, k)
    return sse(x, np.asarray(centers), np.asarray(labels))


def sse(values: np.ndarray, centroids: np.ndarray, indices: np.ndarray) -> float:
    diff = values.astype(np.float64) - centroids.astype(np.float64)[indices]
    return float(np.dot(diff, diff))


def summarise(rows: list[dict]) -> list[dict]:
    """Worst and median SSE ratio per k."""
    out = []
    for k in KS:
        ratios = [r["ratio"] for r in rows if r["k"] == k]
        if ratios:
            out.append({"k": k, "tensors": len(ratios), "values": sum(r["n"] for r in rows if r["k"] == k),
                        "worst": max(ratios), "median": statistics.median(ratios)})
    return out


# -- speed: every Conv/Linear weight of VGG-16 at k = 256 ------------------------------------


def warm_up() -> None:
    """Call every kernel specialisation once: small and large tensors, int64 and uint8."""
    rng = np.random.default_rng(0)
    for n in (1000, 100_000):
        values = rng.standard_normal(n).astype(np.float32)
        for dtype in (np.int64, np.uint8):
            cluster(values, 16, None, dtype)
        cluster(values, 16, np.ones(n), np.int64)


def compile_probe() -> None:
    """Run by :func:`compile_seconds` in a fresh process: print the warm-up's seconds."""
    started = time.perf_counter()
    warm_up()
    print(time.perf_counter() - started)


def compile_seconds() -> float:
    """Seconds of the first calls in a fresh process with an empty numba cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        command = [sys.executable, __file__, "--compile-probe"]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return round(float(out.stdout.split()[-1]), 2)


def speed(args: argparse.Namespace, first_call: float) -> dict:
    """Seconds to cluster all 16 VGG-16 weight tensors at k = 256, after warm-up."""
    compiled = compile_seconds()
    weights = vgg16_weights()
    load = [os.getloadavg()]
    public = [time_all(weights, lambda w: labelless.kmeans1d(w, SPEED_K)) for _ in range(args.repeats)]
    load.append(os.getloadavg())
    flat = [w.reshape(-1).numpy() for w in weights]
    uint8 = [time_all(flat, lambda v: cluster(v, SPEED_K, None, np.uint8)) for _ in range(args.repeats)]
    load.append(os.getloadavg())
    return {"compile_seconds": compiled, "first_call_cached_seconds": round(first_call, 2), "k": SPEED_K,
            "tensors": len(weights), "values": sum(w.numel() for w in weights), "repeats": args.repeats,
            "public_seconds": public, "uint8_seconds": uint8, "load_average": load,
            "per_tensor_uint8": per_tensor(flat)}


def vgg16_weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.vgg16()
    return [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def time_all(tensors: list, fn) -> float:
    started = time.perf_counter()
    for tensor in tensors:
        fn(tensor)
    return round(time.perf_counter() - started, 3)


def per_tensor(flat: list[np.ndarray]) -> list[dict]:
    rows = []
    for values in flat:
        started = time.perf_counter()
        cluster(values, SPEED_K, None, np.uint8)
        rows.append({"n": int(values.size), "seconds": round(time.perf_counter() - started, 4)})
    return rows


# -- scikit-learn ---------------------------------------------------------------------------


def versus_sklearn(tensors: dict[str, torch.Tensor], args: argparse.Namespace) -> list[dict]:
    """KMeans(n_init=1) against us on three real 50k-300k value tensors and one of ~1M."""
    sizes: dict[int, str] = {}
    for name, tensor in tensors.items():  # one tensor per size, in module order
        if 50_000 <= tensor.numel() <= 300_000:
            sizes.setdefault(tensor.numel(), name)
    names = list(sizes.values())[: 1 if args.quick else 3]
    large = [name for name, tensor in tensors.items() if 1_000_000 <= tensor.numel() <= 1_500_000]
    names += large[:1] if not args.quick else []
    ks = SKLEARN_KS[:1] if args.quick else SKLEARN_KS
    return [sklearn_row(name, tensors[name].reshape(-1).numpy(), k) for name in names for k in ks]


def add_optimum(sklearn_rows: list[dict], quality_rows: list[dict]) -> None:
    """Copy the exact optimum, where the quality table has it, into the scikit-learn rows."""
    optimum = {(r["tensor"], r["k"]): r["optimal_sse"] for r in quality_rows}
    for row in sklearn_rows:
        row["optimal_sse"] = optimum.get((row["tensor"], row["k"]))


def sklearn_row(name: str, values: np.ndarray, k: int) -> dict:
    from sklearn.cluster import KMeans

    load = os.getloadavg()[0]
    started = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(values.reshape(-1, 1))
    sklearn_seconds = time.perf_counter() - started
    sklearn_sse = sse(values, km.cluster_centers_[:, 0], km.labels_)
    ours_seconds = []
    for _ in range(7):
        started = time.perf_counter()
        centroids, indices = labelless.kmeans1d(torch.from_numpy(values), k)
        ours_seconds.append(time.perf_counter() - started)
    ours = sse(values, centroids.numpy(), indices.numpy())
    print(f"  sklearn {name} k={k}: {sklearn_seconds:.2f} s", file=sys.stderr)
    return {"tensor": name, "n": int(values.size), "k": k, "sklearn_seconds": sklearn_seconds,
            "ours_seconds": statistics.median(ours_seconds),
            "ours_seconds_min": min(ours_seconds), "sklearn_sse": sklearn_sse, "sse": ours,
            "sklearn_iterations": int(km.n_iter_), "load_average": load,
            "time_ratio": sklearn_seconds / statistics.median(ours_seconds), "sse_ratio": ours / sklearn_sse}


# -- report ---------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    w = result["weights"]
    trained = f", test accuracy {w['test_accuracy_1000']:.3f} on 1000 images" if "test_accuracy_1000" in w else ""
    head = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {result['date']}.",
            f"Weights: {w['source']}{trained}", ""]
    return "\n".join(head + quality_tables(result["quality"]) + speed_table(result["speed"])
                     + sklearn_table(result["sklearn"]))


def quality_tables(q: dict) -> list[str]:
    lines = [f"SSE / optimal SSE ({q['reference']}), per k:", "", "| k | tensors | values | worst | median |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['k']} | {s['tensors']} | {s['values']:,} | {s['worst']:.6f} | {s['median']:.6f} |"
              for s in q["summary"]]
    lines += ["", "| tensor | values | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|---:|" + "---:|" * len(KS)]
    by_tensor: dict[str, dict] = {}
    for r in q["rows"]:
        by_tensor.setdefault(r["tensor"], {"n": r["n"]})[r["k"]] = r["ratio"]
    for name, cells in by_tensor.items():
        ratios = " | ".join(f"{cells[k]:.6f}" if k in cells else "-" for k in KS)
        lines.append(f"| {name} | {cells['n']:,} | {ratios} |")
    return lines + ["", f"-: values x k above the reference's budget ({q['budget']:.0e}).", ""]


def speed_table(s: dict) -> list[str]:
    def cell(times: list[float]) -> str:
        return f"{min(times):.2f} | {statistics.median(times):.2f}"

    return [f"VGG-16, {s['tensors']} Conv/Linear weights, {s['values']:,} values, k={s['k']}, "
            f"{s['repeats']} runs; 1-minute load average {s['load_average'][0][0]:.2f} "
            f"to {s['load_average'][-1][0]:.2f}:",
            "", "| path | best s | median s |", "|---|---:|---:|",
            f"| `kmeans1d` (int64 indices) | {cell(s['public_seconds'])} |",
            f"| `cluster(..., np.uint8)` | {cell(s['uint8_seconds'])} |", "",
            f"numba compile on first ever call (empty cache): {s['compile_seconds']} s; "
            f"first call with the on-disk cache: {s['first_call_cached_seconds']} s.", ""]


def sklearn_table(rows: list[dict]) -> list[str]:
    lines = ["scikit-learn `KMeans(n_clusters=k, n_init=1)` against `kmeans1d` (median of 7 runs):", "",
             "| tensor | values | k | load | sklearn s | ours s | speed-up | SSE ours / sklearn | sklearn / optimal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_opt = f"{r['sklearn_sse'] / r['optimal_sse']:.4f}" if r.get("optimal_sse") else "-"
        lines.append(f"| {r['tensor']} | {r['n']:,} | {r['k']} | {r['load_average']:.1f} | {r['sklearn_seconds']:.2f} "
                     f"| {r['ours_seconds']:.4f} | {r['time_ratio']:.0f}x | {r['sse_ratio']:.6f} | {vs_opt} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
