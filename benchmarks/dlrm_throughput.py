"""DLRM train-step throughput: JAX (this project) against the PyTorch reference, in one run.

Criteo Kaggle reference configuration: 13 dense and 26 sparse features with the real Kaggle
cardinalities, embedding dim 16, bottom MLP 13-512-256-64-16, top MLP 512-256-1, dot interaction,
SGD lr 0.1 (dense and embeddings), batch 2048, Zipf-skewed ids drawn exactly as the reference
draws them. Each side runs in its own subprocess, alternating, so that peak RSS is per framework;
the PyTorch side is ../shared/bench/torch_dlrm.py, run when torch is importable.
--dtype=bf16 runs the dense half in bfloat16 on both sides (JAX: config.model.dtype; PyTorch:
autocast); parameters and optimizer state stay fp32 on both.
--device=gpu runs both sides on the first CUDA GPU: JAX on its default (GPU) backend, PyTorch with
the reference's own model class and batch recipe moved to CUDA (the reference script itself is
CPU-only), each timed after the device has finished its queued work.

    python benchmarks/dlrm_throughput.py [--steps 30] [--repeats 2] [--rows-cap 0] [--dtype fp32]
                                         [--device cpu] [--torch-ref PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> config.model.dtype
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(os.path.dirname(REPO), "shared", "bench", "torch_dlrm.py")


def gpu_model() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out.splitlines()[0] if out else "unknown GPU"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_child(cmd: list[str]) -> tuple[str, float]:
    """Runs a command; returns its stdout and its own peak RSS in MiB (from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": REPO})
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{cmd} failed:\n{err.read()[-3000:]}")
        return out.read(), rusage.ru_maxrss / 1024


def jax_worker(args) -> None:
    """Measures the JAX step in this process and prints one JSON line."""
    from autoshard_jax.train.runtime import configure_cpu_runtime, release_host_memory

    if args.device == "cpu":
        configure_cpu_runtime()
    import jax

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device=gpu: JAX's default backend is {jax.default_backend()}, "
                         "not gpu (install jax[cuda12] or jax[cuda13])")
    import numpy as np
    import optax

    from autoshard_jax.models.dlrm import DLRMDense
    from autoshard_jax.optim.sparse import sgd
    from autoshard_jax.tables.spec import CRITEO_KAGGLE_ROWS, criteo_tables
    from autoshard_jax.train.step import (
        LocalEmbeddingStage,
        dense_loss_and_grads,
        setup_training,
    )

    b = args.batch
    tables = criteo_tables(CRITEO_KAGGLE_ROWS, 16, rows_cap=args.rows_cap)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):  # the reference's recipe, so both sides see the same id skew
        dense = np.log1p(rng.exponential(5.0, (b, 13))).astype(np.float32)
        ids = tuple(np.minimum(rng.zipf(1.2, (b, 1)) - 1, t.rows - 1).astype(np.int32)
                    for t in tables)
        label = (rng.random(b) < 0.25).astype(np.float32)
        batches.append({"dense": dense, "ids": ids, "label": label})

    dense_model = DLRMDense((512, 256, 64, 16), (512, 256, 1), interaction="dot",
                            dtype=DTYPES[args.dtype])
    stage = LocalEmbeddingStage(tables, sgd(0.1))
    tx = optax.sgd(0.1)
    # The training loop's setup: the step compiles before the tables exist, then the compiler's
    # scratch goes back to the OS.
    t0 = time.perf_counter()
    setup = setup_training(stage, dense_model, tx, batches[0])
    compile_s = time.perf_counter() - t0
    step = setup.train_step
    temp_mib = step.memory_analysis().temp_size_in_bytes / 2**20
    batches = [setup.place(b) for b in batches]
    release_host_memory()
    state = setup.init(jax.random.key(0))

    def timed(fn, n):
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(i)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n

    holder = {"state": state}

    def one_step(i):
        holder["state"], metrics = step(holder["state"], batches[i % 4])
        return metrics["loss"]

    timed(one_step, args.warmup)
    # Each XLA worker thread's malloc arena first has to hold a step buffer of its own
    # (train/runtime.py); until then steps page-fault it in. Time the steady state.
    for _ in range(20):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        timed(one_step, 1)
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 100:
            break
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step_s = timed(one_step, args.steps)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps
    state = holder["state"]
    train_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Breakdown: the three phases as separate programs (no fusion across them).
    lookup = jax.jit(stage.lookup)
    dense_fb = jax.jit(lambda p, batch, pooled: dense_loss_and_grads(dense_model, p, batch,
                                                                     pooled))
    update = jax.jit(stage.update, donate_argnums=(0,))
    tables_p = state.params["embedding"]
    pooled = lookup(tables_p, batches[0]["ids"])
    _, _, _, g_pooled = dense_fb(state.params["dense"], batches[0], pooled)
    phases = {
        "embedding_forward": timed(lambda i: lookup(tables_p, batches[i % 4]["ids"]), args.steps),
        "dense_forward_backward": timed(
            lambda i: dense_fb(state.params["dense"], batches[i % 4], pooled), args.steps),
    }
    emb = {"tables": tables_p, "state": state.opt_state["embedding"]}

    def one_update(i):
        emb["tables"], emb["state"] = update(emb["tables"], emb["state"], batches[i % 4]["ids"],
                                             g_pooled, state.step)
        return emb["tables"]

    one_update(0)
    phases["embedding_update"] = timed(one_update, args.steps)
    print(json.dumps({"samples_per_s": b / step_s, "step_ms": step_s * 1e3,
                      "compile_s": compile_s, "train_peak_rss_mib": train_peak_mib,
                      "page_faults_per_step": faults_per_step, "step_temp_mib": temp_mib,
                      "phases_ms": {k: v * 1e3 for k, v in phases.items()},
                      "backend": jax.default_backend(), "jax": jax.__version__}))


def torch_gpu_worker(args) -> None:
    """The reference DLRM's train step on CUDA: its model class and batch recipe, imported from the
    reference script, with a synchronize before each clock read. Prints the reference's line."""
    import importlib.util as iu

    import numpy as np
    import torch

    spec = iu.spec_from_file_location("torch_dlrm", args.torch_ref)
    ref = iu.module_from_spec(spec)
    spec.loader.exec_module(ref)
    if not torch.cuda.is_available():
        raise SystemExit("--device=gpu: torch.cuda.is_available() is False")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = [min(r, args.rows_cap) if args.rows_cap else r for r in ref.KAGGLE_ROWS]
    model = ref.DLRM(rows).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.BCELoss()
    b = args.batch
    batches = []
    for _ in range(4):  # the reference's recipe (same draws in the same order)
        dense = torch.tensor(np.log1p(rng.exponential(5.0, (b, 13))), dtype=torch.float32)
        idx = [torch.tensor(np.minimum(rng.zipf(1.2, b) - 1, r - 1), dtype=torch.int64)
               for r in rows]
        off = [torch.arange(b, dtype=torch.int64) for _ in rows]
        y = torch.tensor(rng.random((b, 1)) < 0.25, dtype=torch.float32)
        batches.append((dense.to(dev), [i.to(dev) for i in idx], [o.to(dev) for o in off],
                        y.to(dev)))

    def step(batch):
        dense, idx, off, y = batch
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            p = model(dense, idx, off)
        loss = loss_fn(p.float(), y)
        loss.backward()
        opt.step()
        return loss

    for i in range(args.warmup):
        step(batches[i % 4])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 4])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"torch_dlrm samples_per_s={args.steps * b / dt:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    ap.add_argument("--rows-cap", type=int, default=0, help="cap table rows (small machines)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="dense half's compute dtype, both sides")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="where both sides run (gpu: the first CUDA GPU)")
    ap.add_argument("--torch-ref", default=TORCH_REF, help="the PyTorch reference script")
    ap.add_argument("--worker", choices=["jax", "torch_gpu"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "jax":
        jax_worker(args)
        return
    if args.worker == "torch_gpu":
        torch_gpu_worker(args)
        return

    common = ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--rows-cap", str(args.rows_cap), "--dtype", args.dtype]
    have_torch = importlib.util.find_spec("torch") is not None and os.path.exists(args.torch_ref)
    if not have_torch:
        print(f"torch (or {args.torch_ref}) not found: JAX figures only. "
              "`pip install '.[torch]'` to compare.")
    if args.device == "gpu":
        torch_cmd = [sys.executable, __file__, "--worker", "torch_gpu", "--device", "gpu",
                     "--torch-ref", args.torch_ref, *common]
        where = f"{gpu_model()}; host {cpu_model()}"
    else:
        torch_cmd = [sys.executable, args.torch_ref, *common]
        where = cpu_model()
    print(f"{where}, {os.cpu_count()} cores visible, affinity "
          f"{sorted(os.sched_getaffinity(0))}; load average {load()} at start", flush=True)
    results = {"jax": [], "torch": []}
    for r in range(args.repeats):
        out, rss = run_child([sys.executable, __file__, "--worker", "jax", "--device",
                                    args.device, *common])
        record = json.loads(out.strip().splitlines()[-1])
        # The breakdown below compiles three more programs; peak RSS is the training part's.
        record["peak_rss_mib"] = record.pop("train_peak_rss_mib")
        record["process_peak_rss_mib"] = rss
        results["jax"].append(record)
        print(f"[run {r}] jax   {record['samples_per_s']:9.0f} samples/s  "
              f"peak RSS {record['peak_rss_mib']:7.0f} MiB (whole process with the breakdown: "
              f"{rss:.0f}), {record['page_faults_per_step']:.0f} page faults/step", flush=True)
        if have_torch:
            out, rss = run_child(torch_cmd)
            sps = float(out.strip().split("samples_per_s=")[-1])
            results["torch"].append({"samples_per_s": sps, "peak_rss_mib": rss})
            print(f"[run {r}] torch {sps:9.0f} samples/s  peak RSS {rss:7.0f} MiB", flush=True)

    jax_sps = statistics.median(x["samples_per_s"] for x in results["jax"])
    jax_rss = max(x["peak_rss_mib"] for x in results["jax"])
    last = results["jax"][-1]
    print(f"\nDLRM Criteo-Kaggle config, {args.dtype}, batch {args.batch}, rows_cap "
          f"{args.rows_cap or 'none'}, {where}, {len(os.sched_getaffinity(0))} CPU cores "
          f"used, load average {load()} at the end, {last['backend']} backend, jax {last['jax']}")
    print(f"{'':8s}{'samples/s':>12s}{'peak RSS MiB':>14s}")
    print(f"{'jax':8s}{jax_sps:12.0f}{jax_rss:14.0f}")
    if results["torch"]:
        t_sps = statistics.median(x["samples_per_s"] for x in results["torch"])
        t_rss = max(x["peak_rss_mib"] for x in results["torch"])
        ratios = [j["samples_per_s"] / t["samples_per_s"]
                  for j, t in zip(results["jax"], results["torch"], strict=True)]
        print(f"{'torch':8s}{t_sps:12.0f}{t_rss:14.0f}")
        print(f"throughput ratio jax/torch: {statistics.median(ratios):.2f}x "
              f"(per run: {', '.join(f'{x:.2f}' for x in ratios)});  "
              f"peak RSS ratio jax/torch: {jax_rss / t_rss:.2f}")
    print(f"JAX step {last['step_ms']:.1f} ms (compile {last['compile_s']:.1f} s, step temp "
          f"buffer {last['step_temp_mib']:.0f} MiB, {last['page_faults_per_step']:.0f} page "
          "faults/step); phases run as separate programs:")
    for name, ms in last["phases_ms"].items():
        print(f"  {name:24s}{ms:8.2f} ms")


if __name__ == "__main__":
    main()
