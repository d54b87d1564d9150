"""The machine a command runs on: device choice, machine description, git commit, Ray start.

Each is written once here; train, tune, report, predict and the benchmarks call these. ``ray`` is
imported lazily (inside :func:`ray_init` / :func:`ray_has_gpu`) so the unit layer never needs it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

from pipeline.errors import UserError


def pick_device(choice: str, knob: str = "device"):
    """torch.device for ``auto`` (cuda when visible) / ``cpu`` / ``cuda``; ``cuda`` without a visible
    CUDA device is a UserError naming ``knob``."""
    import torch

    if choice not in ("auto", "cpu", "cuda"):
        raise UserError(f"{knob} must be auto, cpu or cuda, got {choice!r} ({knob})")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{knob} is cuda but no CUDA device is visible ({knob})")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """One line naming the device figures were measured on (GPU model + CUDA, or CPU model + threads)."""
    import torch

    version = torch.__version__.split("+")[0]
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {version})"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads (torch {version})"


def git_commit(short: bool = False) -> str:
    """The checkout's commit ("unknown" outside a git checkout)."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        # git finds the checkout from this file's folder (not storage.REPO: storage pulls pyarrow, and
        # benchmarks/gpu_bench.py, torch + pyyaml only, calls machine_info())
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """What a reader needs to compare figures: CPU, cores, memory, load, library versions, GPU, commit."""
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu": cpu_model()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["mem_gb"] = round(int(mem[1]) / 2**20, 1)
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, IndexError, ValueError):
        pass
    try:
        import torch
        import torchvision

        info["torch"], info["torchvision"] = torch.__version__, torchvision.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    info["git_commit"] = git_commit(short=True)
    return info


def handle_sigterm() -> None:
    """SIGTERM -> errors.Terminated in the main thread (a KeyboardInterrupt: every `ending_run` ends
    its MLflow run KILLED, the CLI exits 143). Installed by the CLI and again after ray.init, whose
    own handler (sys.exit from inside Ray) would end the process with a native abort."""
    import signal
    import threading

    from pipeline.errors import Terminated

    def raise_terminated(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def ray_init(address: str = "", *, num_cpus: int | None = None, temp_dir: str | Path | None = None,
             log_to_driver: bool | None = None) -> bool:
    """Connect to Ray once per process; returns True when this call started a local Ray (the caller
    owns it and may ``ray.shutdown()``), False when Ray was already up or a cluster was joined.

    ``address`` (or RAY_ADDRESS): join that cluster, whose job runtime env applies. Empty: a local Ray
    of our own (``address="local"`` never joins someone else's) with this checkout on PYTHONPATH.
    Worker logs stay in Ray's session logs unless SEGPIPE_RAY_LOGS=1 (progress reaches the driver
    through the trainers' callbacks). On a local Ray this process's Ray Train runs skip the
    preemption watcher (no_preemption_watch_when_local), also when Ray was already up."""
    import ray

    no_preemption_watch_when_local(address)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if log_to_driver is None:
        log_to_driver = os.environ.get("SEGPIPE_RAY_LOGS", "") not in ("", "0")
    if address and os.environ.get(SHARED_ENV) != address:
        ray.init(address=address, log_to_driver=log_to_driver)
        handle_sigterm()
        return False
    if address:  # the local Ray a `segpipe quickstart` started for all its stages: same set-up as our own
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=_local_runtime_env())
        handle_sigterm()
        return False
    kwargs = {"num_cpus": num_cpus} if num_cpus else {}
    if temp_dir is not None:
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = str(temp_dir)
    ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env=_local_runtime_env(), **kwargs)
    handle_sigterm()
    return True


SHARED_ENV = "SEGPIPE_SHARED_RAY"  # the address of a local Ray started by shared_local_ray (set for children)


def ray_is_local(address: str = "") -> bool:
    """True when Ray runs on this machine only: no cluster named (ray.address / RAY_ADDRESS), or the
    one a quickstart started for its stages."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    return not address or os.environ.get(SHARED_ENV) == address


def no_preemption_watch_when_local(address: str = "") -> None:
    """One machine cannot be preempted: when Ray is local (our own, or a quickstart's shared one),
    Ray Train's preemption watcher (one actor process per run, ~1.3 CPU-s to start on 2 cores) is
    turned off for this process's runs; the setting travels to each run's controller with Train's
    propagated variables. A cluster keeps it. Called by ray_init, before any TorchTrainer is built."""
    if ray_is_local(address):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _local_runtime_env() -> dict:
    """A local Ray's job env: this checkout first, then the driver's own PYTHONPATH (the workers
    import what the driver imports)."""
    from pipeline.storage import REPO

    pythonpath = os.pathsep.join([str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    return {"env_vars": {"PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0"}}


@contextlib.contextmanager
def shared_local_ray(num_cpus: int | None = None, temp_dir: str | Path | None = None):
    """Start one local Ray in this process for the child processes it runs (the DVC stages of a
    quickstart): yields the environment they need (RAY_ADDRESS = its GCS address, and SHARED_ENV so
    ray_init joins it with the local job env). Every stage and tune trial then joins it instead of
    starting its own Ray (10-20 s each on 2 cores). Stopped (ray.shutdown) when the block ends."""
    import ray

    before = dict(os.environ)
    ray_init(num_cpus=num_cpus, temp_dir=temp_dir, log_to_driver=False)
    try:
        address = ray.get_runtime_context().gcs_address
        # what ray.init put in this process's environment for its clients (e.g. the cluster's auth
        # token when Ray runs with token authentication) goes to the children too
        added = {k: v for k, v in os.environ.items() if k.startswith("RAY_") and before.get(k) != v}
        yield {**added, "RAY_ADDRESS": address, SHARED_ENV: address}
    finally:
        shutdown_ray()


def shutdown_ray(timeout: float = 15.0) -> bool:
    """ray.shutdown(), bounded; True when it returned in time. Ray's shutdown can block forever in
    the RPC that closes the driver's GCS subscriber (ray-project/ray#44836, #45044: seen here at the
    end of a long-lived driver). It runs in a thread; after `timeout` s the Ray processes below this
    one (the local Ray it started: GCS, raylet, workers) are stopped by PID, which also fails that
    RPC, and we go on. A cluster's processes are not below this one and are never touched."""
    import threading

    import ray

    done = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    done.start()
    done.join(timeout)
    if not done.is_alive():
        return True
    import psutil

    ours = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmd:
            ours.append(child)
    for child in ours:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(ours, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    done.join(5)
    return False


def ray_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
